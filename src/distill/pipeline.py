"""`distill run`: generate → train → eval → report, each stage skipped when its inputs are unchanged.

Run as: `distill run cfg.yaml [overrides]` or `distill.run(config)`.

Every stage has a fingerprint: a hash of the config fields that change its artifact (`distill.stage_inputs`;
batch sizes, timeouts, threads and logging change none), the bytes of the files it reads, and the
fingerprints of the stages it depends on. `RUN_DIR/stages.json` records the fingerprint of each finished
stage, so a rerun does no work, a changed input reruns exactly the stages downstream of it, and a crashed
run resumes (generation skips finished rows; training resumes from its last checkpoint when its
fingerprint is unchanged, and starts over when it changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.config import Config, load_config, save_config
from distill.preflight import preflight
from distill.stage_inputs import stage_values

console = Console(stderr=True)
STAGES_FILE = "stages.json"
BIG_FILE = 64 << 20


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file or of every file under a directory (names and bytes); None for hf: datasets.

    Files over 64 MB (model weights) are fingerprinted by size and modification time instead of their bytes,
    so a rerun does not re-read a large teacher's weights.
    """
    if path is None:
        return None
    p = Path(str(path))
    if not p.exists():
        return None if str(path).startswith("hf:") else f"missing:{p}"
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        stat = f.stat()
        if stat.st_size > BIG_FILE:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            continue
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _input(cfg: Config, path: str | None) -> str | None:
    """Digest of an input path as the stages resolve it (as given, else relative to run_dir)."""
    if path is None or str(path).startswith("hf:") or Path(path).exists():
        return file_digest(path)
    return file_digest(cfg.path(path))


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageLog:
    """RUN_DIR/stages.json: which stage finished with which fingerprint (written atomically)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STAGES_FILE
        self.data: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, name: str, fp: str, outputs: dict | None = None) -> bool:
        """Finished with this fingerprint, and (when given) its outputs are still the files it wrote."""
        entry = self.data.get(name, {})
        if entry.get("fingerprint") != fp or entry.get("status") != "done":
            return False
        return outputs is None or entry.get("outputs") == outputs

    def started_with(self, name: str) -> str | None:
        return self.data.get(name, {}).get("fingerprint")

    def mark(self, name: str, fp: str, status: str, **extra: Any) -> None:
        self.data[name] = {"fingerprint": fp, "status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def stage_fingerprints(cfg: Config) -> dict[str, str]:
    """The fingerprint of every stage of this config, in pipeline order.

    Only the fields that change a stage's artifact are hashed (`distill.stage_inputs`): generation hashes its
    store's identity (the row key's teacher and parameters), so operational settings (batch sizes, timeouts,
    threads, logging) rerun nothing."""
    from distill.teachers.generate import store_meta

    fps: dict[str, str] = {}
    uses_store = cfg.generate.input is not None
    if uses_store:
        fps["generate"] = fingerprint(
            "generate", store_meta(cfg), stage_values(cfg, "generate"), _input(cfg, cfg.generate.input)
        )
    teacher = cfg.teacher.model
    teacher_fp = _input(cfg, teacher) if teacher and Path(teacher).exists() else teacher
    for s in cfg.all_students():
        t = cfg.train_for(s)
        reads_store = uses_store and (t.signal == "offline" or t.input is None)
        fps[f"train:{s.name}"] = fingerprint(
            "train", stage_values(cfg, "train", s), _input(cfg, t.input),
            fps.get("generate") if reads_store else None, teacher_fp,
        )
    trains = [fps[k] for k in fps if k.startswith("train:")]
    fps["eval"] = fingerprint("eval", stage_values(cfg, "eval"), trains, _input(cfg, cfg.eval.input))
    fps["report"] = fingerprint("report", fps["eval"])
    return fps


def outputs_signature(paths: list[Path]) -> dict[str, list[int] | None]:
    """{file: [size, mtime_ns]} for every file of `paths` (a missing path maps to None): cheap to take even for
    a large store, and it changes when a file is deleted, rewritten or replaced."""
    sig: dict[str, list[int] | None] = {}
    for p in paths:
        if not p.exists():
            sig[str(p)] = None
            continue
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        for f in files:
            st = f.stat()
            sig[str(f)] = [st.st_size, st.st_mtime_ns]
    return sig


def stage_outputs(cfg: Config, name: str) -> list[Path]:
    """The files a stage writes (a train stage: its weights, config and summary, not the model card that the
    report stage adds to the same directory)."""
    run_dir = Path(cfg.run_dir)
    if name == "generate":  # the rows and their settings; not the per-worker config copies and manifests
        store = cfg.path(cfg.generate.store)
        return [store / "store.json", store / "shards"]
    if name.startswith("train:"):
        d = run_dir / "students" / name.split(":", 1)[1]
        return [d / "config.json", d / "train_summary.json", *sorted(d.glob("*.safetensors"))]
    if name == "eval":
        return [run_dir / "eval" / "results.json"]
    return [run_dir / "report"] + [run_dir / "students" / s.name / "README.md" for s in cfg.all_students()]


def _run_stage(log: StageLog, name: str, fp: str, work: Callable[[], Any], force: bool,
               outputs: Callable[[], list[Path]] | None = None) -> bool:
    """Run `work` unless the stage already finished with this fingerprint and its recorded outputs are still
    the files it wrote; True when it ran."""
    if not force and log.done(name, fp, outputs_signature(outputs()) if outputs else None):
        console.print(f"[dim]skip {name}: inputs and outputs unchanged[/]")
        return False
    if not force and log.done(name, fp):
        console.print(f"[yellow]{name}: its outputs were changed or removed since it ran; running it again[/]")
    console.print(f"[bold cyan]▶ {name}[/]")
    log.mark(name, fp, "running")
    start = time.perf_counter()
    try:
        work()
    except BaseException:  # a crash or Ctrl-C: say so in stages.json instead of leaving it 'running'
        try:
            log.mark(name, fp, "failed")
        except OSError:  # a full or read-only disk: the original error says more
            pass
        raise
    extra = {"outputs": outputs_signature(outputs())} if outputs else {}
    log.mark(name, fp, "done", seconds=round(time.perf_counter() - start, 2), **extra)
    return True


def warn_if_teacher_fails(cfg: Config) -> dict | None:
    """Before any student trains: the teacher's outputs in the store scored against the rows' references
    (eval.metric); a teacher no better than the majority answer is flagged here, not after hours of training."""
    from distill.evaluation.verdict import check_teacher_store

    check = check_teacher_store(cfg)
    if check is not None and check["flagged"]:
        console.print(f"[bold red]warning:[/] {check['reason']} (its store outputs against the references of "
                      f"{check['n']} rows); a student can only copy it", highlight=False, soft_wrap=True)
    return check


def _train(cfg: Config, s, train_student) -> None:
    """Train one student because the pipeline decided it must run: its old summary goes, so training's own
    "already trained" shortcut does not skip it (a finished checkpoint is reloaded, not stepped again)."""
    (Path(cfg.run_dir) / "students" / s.name / "train_summary.json").unlink(missing_ok=True)
    train_student(cfg, s)


def run(config: Config | str | Path | dict, overrides: list[str] | None = None, force: bool = False) -> dict:
    """Run every stage that is out of date; returns {stage: 'ran' | 'skipped'} in order."""
    from distill.evaluation.evaluate import evaluate
    from distill.reporting.report import report
    from distill.teachers.generate import generate
    from distill.training.train import train_student

    cfg = config if isinstance(config, Config) and not overrides else load_config(
        config.model_dump(mode="json") if isinstance(config, Config) else config, overrides
    )
    preflight(cfg, ("generate", "train", "eval") if cfg.generate.input else ("train", "eval"))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    log = StageLog(run_dir)
    fps = stage_fingerprints(cfg)
    outcome: dict[str, str] = {}

    def outs(name: str) -> Callable[[], list[Path]]:
        return lambda: stage_outputs(cfg, name)

    store_changed = False
    if "generate" in fps:
        before = log.data.get("generate", {}).get("outputs")
        seconds_before = log.data.get("generate", {}).get("seconds")
        store_before = outputs_signature(stage_outputs(cfg, "generate"))
        ran = _run_stage(log, "generate", fps["generate"], lambda: generate(cfg), force, outs("generate"))
        outcome["generate"] = "ran" if ran else "skipped"
        warn_if_teacher_fails(cfg)
        # a generate that found nothing to do (a store shared with another run) wrote nothing: no retraining
        store_changed = ran and log.data["generate"].get("outputs") != before
        if ran and outputs_signature(stage_outputs(cfg, "generate")) == store_before:
            # it wrote nothing (the store was filled elsewhere): its seconds were loading the teacher, not the store's cost
            entry = {k: v for k, v in log.data["generate"].items() if k not in ("fingerprint", "status", "time")}
            log.mark("generate", fps["generate"], "done", **{**entry, "seconds": seconds_before})

    for s in cfg.all_students():
        name = f"train:{s.name}"
        fp = fps[name]
        t = cfg.train_for(s)
        # a rerun of generation that changed the store reruns the students that read the store
        upstream = store_changed and (t.signal == "offline" or t.input is None)
        if force or upstream or log.started_with(name) not in (None, fp):
            # The inputs changed since the last (finished or crashed) attempt, or --force: checkpoints are stale.
            shutil.rmtree(run_dir / "checkpoints" / s.name, ignore_errors=True)
        ran = _run_stage(log, name, fp, lambda s=s: _train(cfg, s, train_student), force or upstream, outs(name))
        outcome[name] = "ran" if ran else "skipped"

    trained = any(v == "ran" for k, v in outcome.items() if k.startswith("train:"))
    ran = _run_stage(log, "eval", fps["eval"], lambda: evaluate(cfg), force or trained, outs("eval"))
    outcome["eval"] = "ran" if ran else "skipped"
    ran = _run_stage(log, "report", fps["report"], lambda: report(cfg), force or ran, outs("report"))
    outcome["report"] = "ran" if ran else "skipped"
    return outcome
