"""Checkpoints that resume: which one is complete and intact, whether a training already reached its end.

A kill or a full disk mid-save leaves a checkpoint-N without its last files; the Trainer would trip over it
on every rerun. Each checkpoint gets a marker once the Trainer finished writing it (`mark_complete`), and
resume takes the newest complete one (`last_checkpoint`), removing newer partial ones. A complete checkpoint
can still be damaged later (a 0-byte optimizer.pt makes torch abort the process, a bit flip fails deep inside
torch.load) or hold non-finite weights: `checkpoint_problem` reads it before the Trainer does, and resume
moves such a checkpoint aside and takes the newest intact one. Training itself stops on a non-finite loss
(`check_finite_loss`) and never saves non-finite weights (`finite_weights_guard`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from pathlib import Path

from distill.config import STUDENT_CONFIG_FILE, Config
from distill.errors import UserError
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


TORCH_FILE_SUFFIXES = (".pt", ".pth", ".bin")  # optimizer.pt, scheduler.pt, rng_state*.pth, training_args.bin
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint-N is kept, renamed, out of the Trainer's "checkpoint-*" glob


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a complete checkpoint ('optimizer.pt: empty file'), or None when it is intact.

    torch files (zip archives) are checked against their CRCs without unpickling; safetensors weights are read
    tensor by tensor and must be finite. This reads the checkpoint once, on resume only."""
    try:
        files = sorted(f for f in ckpt.iterdir() if f.is_file())
    except OSError as exc:  # e.g. moved aside by rank 0 while another rank looks at it
        return f"unreadable ({exc.strerror})"
    for f in files:
        if f.stat().st_size == 0 and f.suffix in (*TORCH_FILE_SUFFIXES, ".safetensors"):
            return f"{f.name}: empty file"
        if f.suffix in TORCH_FILE_SUFFIXES:
            problem = _zip_problem(f)
        elif f.suffix == ".safetensors":
            problem = _weights_problem(f)
        else:
            continue
        if problem:
            return f"{f.name}: {problem}"
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive with a CRC per record: a truncated or bit-flipped file fails here."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"damaged ({exc})"
    return f"damaged (checksum mismatch in {bad})" if bad else None


def _weights_problem(path: Path) -> str | None:
    """A safetensors file whose header does not parse, or which holds a NaN or infinite weight."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                tensor = fh.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return f"non-finite weights ({name} holds NaN or inf: the training had diverged)"
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types: any failure to read is damage
        return f"damaged ({' '.join(str(exc).split())[:200]})"
    return None


def _set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint-N to damaged-checkpoint-N (kept for inspection, never resumed or rotated)."""
    target = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{DAMAGED_PREFIX}{n}-{ckpt.name}")
    ckpt.rename(target)
    return target


def last_checkpoint(output_dir: str, clean: bool = True) -> str | None:
    """The newest complete and intact checkpoint-N under output_dir. With clean=True (rank 0 only), newer
    incomplete ones are removed and damaged ones renamed damaged-checkpoint-N, each said in one line, so the
    Trainer does not trip over them later."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    ckpts = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                    and _step_of(p) >= 0), key=_step_of, reverse=True)
    writer = clean and int(os.environ.get("RANK", "0")) == 0
    said: list[str] = []  # one line per checkpoint passed over, printed once the one to resume from is known
    found = None
    for ckpt in ckpts:
        if checkpoint_state(ckpt) is None:
            if writer:
                said.append(f"{ckpt}: incomplete checkpoint (cut off mid-write); removed")
                shutil.rmtree(ckpt, ignore_errors=True)
            continue
        problem = checkpoint_problem(ckpt) if clean else None
        if problem is None:
            found = str(ckpt)
            break
        if writer:
            said.append(f"{ckpt}: damaged checkpoint ({problem}); moved to {_set_aside(ckpt).name}")
    then = f"resuming from {Path(found).name}" if found else "no intact checkpoint left: training starts over"
    for line in said:
        print(f"[distill] {line}, {then}")
    return found


class DivergedError(UserError, RuntimeError):
    """Training produced a non-finite loss or non-finite weights: stopped before anything non-finite is saved."""


def check_finite_loss(loss, step: int, output_dir: str) -> None:
    """Raise DivergedError when the loss (a scalar tensor) is NaN or infinite: backpropagating it would make
    every weight NaN, and the student would be saved with exit code 0. Called before backward, so the weights
    (and every checkpoint written so far) are still the last good ones."""
    value = float(loss.detach())
    if math.isfinite(value):
        return
    raise DivergedError(
        f"training stopped at step {step + 1}: the loss is {value} (not finite); the weights are not updated and "
        f"checkpoints written before it are kept in {output_dir}. Lower train.learning_rate (or a loss weight / "
        "temperature), then rerun: it resumes from the last checkpoint (train.resume=false starts over)"
    )


def finite_weights_guard():
    """A TrainerCallback that checks the weights before each save: a checkpoint or student with NaN / inf
    weights would resume (or serve) silently, so the training stops instead, keeping the earlier checkpoints."""
    import torch
    from transformers import TrainerCallback

    def check(args, state, control, model=None, **kwargs):
        if not (control.should_save and model is not None):
            return control
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.numel() and not bool(torch.isfinite(param.detach()).all()):
                raise DivergedError(
                    f"training stopped at step {state.global_step}: weight {name} became NaN or inf (the update "
                    f"diverged); it is not saved, and checkpoints written before it are kept in {args.output_dir}. "
                    "Lower train.learning_rate (or a loss weight / temperature), then rerun"
                )
        return control

    class FiniteWeights(TrainerCallback):
        on_step_end = staticmethod(check)
        on_epoch_end = staticmethod(check)

    return FiniteWeights()


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
