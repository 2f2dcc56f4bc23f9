"""Checkpoints that resume: which one is complete, whether a training already reached its end.

A kill or a full disk mid-save leaves a checkpoint-N without its last files; the Trainer would trip over it
on every rerun. Each checkpoint gets a marker once the Trainer finished writing it (`mark_complete`), and
resume takes the newest complete one (`last_checkpoint`), removing newer partial ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from distill.config import STUDENT_CONFIG_FILE, Config
from distill.training.early_stopping import stopped_early

CHECKPOINT_COMPLETE = "distill_complete.json"  # written after the Trainer has written everything else
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin")


def _step_of(path: Path) -> int:
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def checkpoint_state(ckpt: Path) -> dict | None:
    """The checkpoint's trainer_state.json when the checkpoint is complete, else None.

    Complete: our marker (written by `mark_complete` once the Trainer finished the checkpoint) is there, or,
    for checkpoints written before the marker existed, trainer_state.json (the Trainer's last file) parses and
    weights are present. A kill or a full disk mid-write leaves neither."""
    state_file = ckpt / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    if (ckpt / CHECKPOINT_COMPLETE).exists() or any((ckpt / f).exists() for f in WEIGHT_FILES):
        return state if isinstance(state, dict) else None
    return None


def last_checkpoint(output_dir: str, clean: bool = True) -> str | None:
    """The newest complete checkpoint-N under output_dir; newer incomplete ones are removed (clean=True) so
    the Trainer does not trip over them later (rank 0 only)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    ckpts = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                    and _step_of(p) >= 0), key=_step_of, reverse=True)
    for ckpt in ckpts:
        if checkpoint_state(ckpt) is not None:
            return str(ckpt)
        if clean and int(os.environ.get("RANK", "0")) == 0:
            print(f"[distill] {ckpt}: incomplete checkpoint (cut off mid-write); removed, resuming from an earlier one")
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def finished(resume: str | None, t) -> dict | None:
    """The checkpoint's state when it is the end of the training this config asks for (rerun: nothing to do)."""
    if resume is None:
        return None
    state = checkpoint_state(Path(resume)) or {}
    if stopped_early(state.get("log_history") or [], t.early_stopping):  # out of patience: done, whatever the budget
        return state
    steps, total = state.get("global_step"), state.get("max_steps")
    if not isinstance(steps, int) or not isinstance(total, int) or total <= 0 or steps < total:
        return None
    if t.max_steps > 0:
        return state if t.max_steps == total else None
    return state if float(state.get("num_train_epochs", -1)) == float(t.num_train_epochs) else None


def student_checkpoint(resume: str, args) -> str:
    """The checkpoint whose weights are the student of a finished training: the best one (lowest held-out loss)
    when the Trainer loads the best model at the end, else the last one. Found by step under the checkpoint
    directory, not by the recorded path, which is stale once run_dir moved."""
    state = checkpoint_state(Path(resume)) or {}
    best = state.get("best_global_step")
    if args.load_best_model_at_end and isinstance(best, int) and best > 0:
        path = Path(resume).parent / f"checkpoint-{best}"
        if checkpoint_state(path) is not None:
            return str(path)
    return resume


def already_trained(cfg: Config, out: Path, name: str) -> bool:
    """The student dir holds the final result of this very config: its saved view equals this one, its summary
    is written, and the newest complete checkpoint is the last step."""
    saved = out / STUDENT_CONFIG_FILE
    if not cfg.train.resume or not saved.exists() or not all(
            (out / f).exists() for f in ("train_summary.json", "config.json")):
        return False
    import yaml

    if yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))):
        return False
    last = last_checkpoint(str(Path(cfg.run_dir) / "checkpoints" / name), clean=False)
    return finished(last, cfg.train) is not None


def mark_complete():
    """A TrainerCallback that writes CHECKPOINT_COMPLETE into each checkpoint once it is fully written."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                tmp = ckpt / f".{CHECKPOINT_COMPLETE}.tmp"
                tmp.write_text(json.dumps({"global_step": state.global_step}))
                os.replace(tmp, ckpt / CHECKPOINT_COMPLETE)
            return control

    return MarkComplete()
