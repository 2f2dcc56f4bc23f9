"""The training stage: config → student(s) in run_dir/students/NAME with their training logs.

Run as: `distill train cfg.yaml [train.learning_rate=3e-4 ...]` or `distill.train(config)`.

Teacher signal, from `train.signal`:
- online: the teacher model runs next to the student and gives dense logits for every batch;
- offline: top-k ids/logprobs saved by `distill generate` are read from the store (no teacher forward);
- none: labels only (the baseline, or plain sequence-level KD on teacher responses with cross_entropy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import STUDENT_CONFIG_FILE, Config, StudentConfig, load_config, save_config
from distill.data.batching import DistillCollator, encode_example, tokenize_pair
from distill.data.encoding import uses_template
from distill.data.prompt_format import save_prompt_format, training_prompt_format
from distill.data.prompts import DataError, iter_rows, record_from_row, render_prompt
from distill.errors import ConfigError, UserError, disk_error_message, disk_errors
from distill.losses.fused import DEFAULT_CHUNK_SIZE
from distill.modeling import load_model, load_tokenizer_for
from distill.preflight import TRACKER_PACKAGES, preflight
from distill.progress import is_live, quiet_library_bars, trainer_callback
from distill.students.build import build_student
from distill.teachers.registry import backend_spec
from distill.training.checkpoints import (
    already_trained,
    finished,
    last_checkpoint,
    mark_complete,
    student_checkpoint,
)
from distill.training.early_stopping import early_stopping, stop_reason


def _as_config(config: Config | str | Path | dict, overrides: list[str] | None = None) -> Config:
    if isinstance(config, Config):
        return config if not overrides else load_config(config.model_dump(mode="json"), overrides)
    return load_config(config, overrides)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def student_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.run_dir) / "students" / name


def store_path(cfg: Config) -> Path:
    return cfg.path(cfg.train.store or cfg.generate.store)


# ---------------------------------------------------------------- examples


def _examples_from_store(cfg: Config, tokenizer, same_tokenizer: bool, want_topk: bool):
    """A lazy Dataset over the store (distill.data.store_examples): rows are decoded per example, never all
    held in memory, and each rank decodes only the indices its sampler gives it."""
    from distill.data.store_examples import StoreExamples

    # the store's prompts were rendered by the teacher: with its chat template only if it renders locally
    templated = backend_spec(cfg.teacher.backend).tokenizer_access and uses_template(tokenizer, cfg.data)
    examples = StoreExamples(store_path(cfg), tokenizer, cfg.train.max_length, same_tokenizer, want_topk,
                             tail=cfg.train.sparse_mode == "tail", templated=templated)
    _say_dropped(len(examples.ids_ok) - len(examples), len(examples.ids_ok), cfg.train.max_length)
    return examples


def _examples_from_file(cfg: Config, tokenizer, source: str) -> list[dict]:
    """Rows with a prompt (or messages) and a response field, or plain text in `train.text_field`."""
    out, dropped = [], 0
    for where, row in iter_rows(source, cfg.data.split):
        if cfg.train.text_field in row and cfg.data.prompt_field not in row and cfg.data.messages_field not in row:
            text = row[cfg.train.text_field]
            if not isinstance(text, str) or not text:
                raise DataError(f"{where}: field '{cfg.train.text_field}' must be a non-empty string")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else ids[:1]
            ex = encode_example(head, ids if tokenizer.bos_token_id is not None else ids[1:], cfg.train.max_length)
        else:
            record = record_from_row(row, where, cfg.data)
            response = row.get(cfg.train.response_field)
            if not isinstance(response, str) or not response:
                response = record.response  # the last assistant turn of `messages`, or TRL's `completion`
            if not isinstance(response, str) or not response:
                raise DataError(
                    f"{where}: missing field '{cfg.train.response_field}' (the target response); fields present: "
                    f"{', '.join(row)}. Set train.response_field, or train on the teacher store (train.input unset)"
                )
            ex = tokenize_pair(tokenizer, render_prompt(record, tokenizer, cfg.data), response, cfg.train.max_length,
                               uses_template(tokenizer, cfg.data))
        if ex is not None:
            out.append(ex)
        else:
            dropped += 1
    _say_dropped(dropped, len(out) + dropped, cfg.train.max_length)
    if not out:
        raise DataError(f"{source}: no usable training examples: every prompt is at least "
                        f"train.max_length={cfg.train.max_length} tokens; raise train.max_length")
    return out


def _say_dropped(dropped: int, total: int, max_length: int) -> None:
    """Training's rule for long rows: responses are cut at train.max_length; a row whose prompt alone fills it
    is left out, and counted here."""
    if dropped:
        print(f"[distill] train: {dropped} of {total} rows left out: their prompt is at least "
              f"train.max_length={max_length} tokens (raise train.max_length to keep them)")


def build_examples(cfg: Config, tokenizer, same_tokenizer: bool):
    """The training examples: a list (files, chain of thought) or a map-style Dataset (the store)."""
    offline = cfg.train.signal == "offline"
    if cfg.train.cot.mode != "off":  # chain of thought: two-task or trace examples from reasoning rows
        from distill.data.cot import build_cot_examples

        return build_cot_examples(cfg, tokenizer)
    if cfg.train.input and not offline:
        return _examples_from_file(cfg, tokenizer, cfg.train.input)
    return _examples_from_store(cfg, tokenizer, same_tokenizer, want_topk=offline)


def split_examples(cfg: Config, examples, tokenizer, cross_teacher_tok=None):
    """(train, eval or None): a seeded shuffle of example *indices* (the examples stay lazy), the first
    `eval_fraction` held out; cross-tokenizer examples get their teacher side on access."""
    from torch.utils.data import Subset

    if cross_teacher_tok is not None:
        from functools import partial

        from distill.data.store_examples import MappedExamples

        examples = MappedExamples(examples, partial(_with_teacher_side, tokenizer, cross_teacher_tok,
                                                    cfg.train.max_length))
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)  # the same permutation shuffling the examples themselves gave
    n_eval = max(1, int(len(order) * cfg.train.eval_fraction)) if cfg.train.eval_fraction > 0 else 0
    train_idx, eval_idx = np.asarray(order[n_eval:], np.int64), np.asarray(order[:n_eval], np.int64)
    return Subset(examples, train_idx), (Subset(examples, eval_idx) if n_eval else None)


def _with_teacher_side(student_tok, teacher_tok, max_length: int, ex: dict) -> dict | None:
    from distill.data.crosstok import add_teacher_side

    out = add_teacher_side([ex], student_tok, teacher_tok, max_length)
    return out[0] if out else None


# ---------------------------------------------------------------- the stage


def _training_args(cfg: Config, out: Path, name: str):
    import dataclasses

    from transformers import TrainingArguments

    t = cfg.train
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = {
        "output_dir": str(Path(cfg.run_dir) / "checkpoints" / name),
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "weight_decay": t.weight_decay,
        "lr_scheduler_type": t.lr_scheduler_type,
        "logging_steps": t.logging_steps,
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "report_to": t.report_to,
        "seed": cfg.seed,
        "remove_unused_columns": False,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": not is_live(),  # a log file gets distill.progress lines, not tqdm's redraws
    }
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = t.warmup_ratio
    else:
        kwargs["warmup_steps"] = t.warmup_ratio  # transformers 5: a float < 1 is a ratio
    if t.eval_fraction > 0:  # held-out loss curve on a split of the training data, next to the training loss
        kwargs.update(eval_strategy="steps", eval_steps=t.eval_steps or t.logging_steps)
    if t.early_stopping.enabled:  # a checkpoint at every evaluation, so the best one exists and is loaded at the end
        kwargs.update(save_steps=kwargs["eval_steps"], load_best_model_at_end=True, metric_for_best_model="eval_loss",
                      greater_is_better=False)
    if "include_num_input_tokens_seen" in fields:  # tokens seen, for the report's training table
        kwargs["include_num_input_tokens_seen"] = "non_padding"
    kwargs.update(t.args)  # names and types checked when the config loaded (config.coerce_training_args)
    return TrainingArguments(**kwargs)


def _collator(cfg: Config, tokenizer, cross_teacher_tok=None):
    """DistillCollator, plus per-example loss weights (chain of thought) and teacher ids (cross-tokenizer)."""
    collator = DistillCollator(pad_token_id=tokenizer.pad_token_id)
    if cfg.train.cot.mode != "off":
        from distill.data.cot import WeightedCollator

        collator = WeightedCollator(collator)
    if cross_teacher_tok is not None:
        from distill.data.crosstok import CrossTokenizerCollator

        collator = CrossTokenizerCollator(collator, cross_teacher_tok.pad_token_id)
    return collator


def _check_onpolicy(cfg: Config, local_teacher: bool, names: set[str], cross):
    """Validate train.onpolicy; returns the API scorer for an openai teacher (None for a local one)."""
    if cfg.train.onpolicy.lmbda <= 0:
        return None
    if cross is not None:
        raise ConfigError("train.onpolicy with cross-tokenizer losses (uld) is not supported: use one tokenizer")
    if backend_spec(cfg.teacher.backend).remote:  # an endpoint scores the samples (sampled reverse KL)
        from distill.training.onpolicy import OpenAIScorer

        return OpenAIScorer(cfg.teacher)
    if not local_teacher or cfg.train.signal != "online":
        raise ConfigError("train.onpolicy needs a teacher to score the student's samples: a local teacher with "
                         "train.signal=online, or teacher.backend=openai (sampled reverse KL)")
    if not names - {"cross_entropy"}:
        raise ConfigError("train.onpolicy with a local teacher needs a divergence in train.losses (e.g. reverse_kl): "
                         "cross_entropy is skipped on sampled batches")
    return None


def loss_chunk_size(configured: int | None) -> int | None:
    """Tokens per loss chunk: train.chunk_size, or the one default (distill.losses.fused.DEFAULT_CHUNK_SIZE, the
    Trainer's too) when unset; 0 turns chunking off. With the fused path (train.fused, the default) a chunk's
    logits are all that exists of the (tokens x vocab) tensors; the plain path holds about ten of them."""
    if configured is None:
        return DEFAULT_CHUNK_SIZE
    return configured or None


def hidden_projections(cfg: Config, student, teacher):
    """One learned student->teacher width projection per layer pair of the hidden losses' layer_map (config
    validation made it one map for all of them; by default every student hidden state, evenly spread over
    the teacher's), after checking its indices against the two models."""
    from distill.losses import HIDDEN_LOSSES, default_layer_map, make_projections

    if teacher is None:  # config validation refuses this; a guard for callers that built a Config by hand
        raise ValueError("hidden-state losses need a live teacher: train.signal=online with a local teacher")
    n_s, n_t = student.config.num_hidden_layers + 1, teacher.config.num_hidden_layers + 1  # embeddings + layers
    i, term = next((i, t) for i, t in enumerate(cfg.train.losses) if t.name in HIDDEN_LOSSES)
    layer_map = term.params.get("layer_map")
    pairs = [tuple(p) for p in layer_map] if layer_map is not None else default_layer_map(n_s, n_t)
    for j, (si, ti) in enumerate(pairs):
        if not (-n_s <= si < n_s and -n_t <= ti < n_t):
            raise ValueError(
                f"train.losses[{i}].params.layer_map[{j}] = ({si}, {ti}) is out of range: {n_s} student and {n_t} "
                "teacher hidden states (index 0 is the embeddings, i is the output of layer i)"
            )
    return make_projections(student.config.hidden_size, teacher.config.hidden_size, len(pairs))


@contextlib.contextmanager
def _user_errors(key: str, value: str | None):
    """Loading a model the user named: its OSError / ValueError becomes one line naming the setting."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and disk_error_message(exc) is not None:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = f"{key} '{value}'" if value is not None else key
        raise ConfigError(f"{where}: {first}") from exc


def _load_tokenizer(name: str, cfg: Config, key: str):
    with _user_errors(key, name):
        return load_tokenizer_for(name, cfg.teacher.trust_remote_code)


@dataclasses.dataclass
class _Sides:
    """What a student trains against, decided once from config + tokenizers (`_sides`)."""

    tokenizer: Any  # the student's
    teacher_tok: Any | None  # a local teacher's
    local_teacher: bool
    same_tokenizer: bool  # the teacher's ids (store or logits) are in the student's vocabulary
    cross: Any | None  # CrossTokenizer when every divergence is a cross-tokenizer loss


def _sides(cfg: Config, scfg: StudentConfig) -> _Sides:
    """The student's tokenizer and how the teacher's signal reaches it: same vocabulary, cross-tokenizer, or an
    API teacher's store ids (teacher.tokenizer); different vocabularies are refused unless labels only."""
    from distill.losses import CROSS_TOKENIZER_LOSSES, check_tokenizers

    local_teacher = backend_spec(cfg.teacher.backend).local_weights and cfg.teacher.model is not None
    teacher_tok = _load_tokenizer(cfg.teacher.model, cfg, "teacher.model") if local_teacher else None
    api_tok = None  # an API teacher's tokenizer (teacher.tokenizer): the store's ids are in its vocabulary
    if teacher_tok is None and backend_spec(cfg.teacher.backend).remote and cfg.teacher.tokenizer:
        api_tok = _load_tokenizer(cfg.teacher.tokenizer, cfg, "teacher.tokenizer")
    if scfg.init in ("lora", "pretrained", "config") and scfg.model:  # config: student.model is its base
        tokenizer = _load_tokenizer(scfg.model, cfg, "student.model")
    elif teacher_tok is not None or api_tok is not None:
        tokenizer = teacher_tok or api_tok
    else:
        raise ConfigError(f"student '{scfg.name}': no tokenizer; set teacher.model (local), teacher.tokenizer "
                          "(openai) or student.model")

    names = {t.name for t in cfg.train.losses}
    online = cfg.train.signal == "online"
    if online and not local_teacher:
        raise ConfigError("train.signal=online needs a local teacher (teacher.backend=hf with teacher.model)")
    # the store's and the logits' ids are the student's only when the vocabularies are one (cross-tokenizer
    # students read the store's text in their own tokenization; the teacher side is re-tokenized from it)
    same_tokenizer = teacher_tok is not None and (tokenizer is teacher_tok or tokenizer.get_vocab() == teacher_tok.get_vocab())
    cross = None  # cross-tokenizer mode (distill.data.crosstok): every divergence is a cross-tokenizer loss
    divergences = names - {"cross_entropy"}
    if teacher_tok is not None and online and divergences and divergences <= CROSS_TOKENIZER_LOSSES:
        from distill.data.crosstok import CrossTokenizer

        cross = CrossTokenizer.from_tokenizers(tokenizer, teacher_tok)
    elif teacher_tok is not None and tokenizer is not teacher_tok:
        if cfg.train.signal != "none" and names != {"cross_entropy"}:
            check_tokenizers(tokenizer, teacher_tok)  # raises with a pointer to cross-tokenizer mode
        else:
            same_tokenizer = False
    if api_tok is not None:  # the store's ids are usable when the student has the API teacher's vocabulary
        if cfg.train.signal == "offline" and names != {"cross_entropy"}:
            check_tokenizers(tokenizer, api_tok)  # raises with a pointer to cross-tokenizer mode
        same_tokenizer = tokenizer.get_vocab() == api_tok.get_vocab()
    return _Sides(tokenizer, teacher_tok, local_teacher, same_tokenizer, cross)


def _models(cfg: Config, scfg: StudentConfig, sides: _Sides):
    """(student, StudentInfo, teacher or None): the teacher is loaded for online logits and for pruning, and
    kept only for online logits."""
    online = cfg.train.signal == "online"
    teacher = None
    if online or scfg.init in ("prune", "minitron"):
        with _user_errors("teacher.model", cfg.teacher.model):
            teacher = load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device="cpu", runs_on="auto",
                                 trust_remote_code=cfg.teacher.trust_remote_code)
    calibration = None
    if scfg.init == "minitron":  # prompts whose activations rank the teacher's heads, channels and layers
        from distill.students.minitron import calibration_prompts

        calibration = calibration_prompts(cfg, sides.tokenizer)
    with _user_errors(f"student '{scfg.name}'", None):  # build_student's ValueErrors name the student setting
        student, info = build_student(scfg, teacher=teacher,
                                      teacher_path=cfg.teacher.model if sides.local_teacher else None,
                                      trust_remote_code=cfg.teacher.trust_remote_code, calibration=calibration,
                                      pad_id=sides.tokenizer.pad_token_id)
    return student, info, teacher if online else None  # a pruning-only teacher is freed before training


@contextlib.contextmanager
def _tracker_errors(report_to: list[str], output_dir: str):
    """A tracker of train.report_to that refuses to log (MLflow 3.13+ refuses a './mlruns' file store; a server
    that is down; a missing API key) is one line naming it, not a traceback from inside Trainer.train."""
    try:
        yield
    except Exception as exc:
        package = type(exc).__module__.split(".")[0]
        name = next((r for r in report_to if TRACKER_PACKAGES.get(r, r) == package), None)
        if name is None:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"train.report_to: {name} refused to log: {first}. Fix its setup (for MLflow: "
                          f"MLFLOW_TRACKING_URI=sqlite:///mlflow.db) or remove '{name}' from train.report_to; "
                          f"checkpoints already written in {output_dir} are kept") from exc


def _fit(trainer, cfg: Config, output_dir: str):
    """(train result or None, resumed-from checkpoint, seconds): resume from the newest complete checkpoint;
    a training already at its end is loaded, not stepped again."""
    resume = last_checkpoint(output_dir) if cfg.train.resume else None
    start = time.perf_counter()
    with disk_errors(output_dir, f"checkpoints already written in {output_dir} are kept"), \
            _tracker_errors(cfg.train.report_to, output_dir):
        if finished(resume, cfg.train) is not None:  # trained to the end before: load, do not step again
            trainer._load_from_checkpoint(student_checkpoint(resume, trainer.args))
            trainer.state = type(trainer.state).load_from_json(str(Path(resume) / "trainer_state.json"))
            result = None
        else:
            result = trainer.train(resume_from_checkpoint=resume)
    return result, resume, time.perf_counter() - start


def train_student(cfg: Config, scfg: StudentConfig) -> Path:
    """Train one student; returns its directory (HF format + train_log.json + train_summary.json)."""
    from distill.losses import HIDDEN_LOSSES
    from distill.training.trainer import (  # transformers.Trainer: import only when training
        DistillationTrainer,
        LossSpec,
    )

    cfg = cfg.for_student(scfg)  # per-student train overrides (e.g. a labels-only baseline next to a KD student)
    quiet_library_bars()
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = student_dir(cfg, scfg.name)
    if already_trained(cfg, out, scfg.name):
        print(f"[distill] student '{scfg.name}': already trained to the end with this config ({out}); nothing to do")
        return out
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under torchrun / accelerate launch
        # this student's view (its train overrides applied) beside its weights; run_dir/config.yaml stays the run's
        with disk_errors(out):
            save_config(cfg, out / STUDENT_CONFIG_FILE)

    sides = _sides(cfg, scfg)
    names = {t.name for t in cfg.train.losses}
    scorer = _check_onpolicy(cfg, sides.local_teacher, names, sides.cross)
    student, info, teacher = _models(cfg, scfg, sides)
    cross_tok = sides.teacher_tok if sides.cross is not None else None
    examples, eval_examples = split_examples(cfg, build_examples(cfg, sides.tokenizer, sides.same_tokenizer),
                                             sides.tokenizer, cross_tok)
    args = _training_args(cfg, out, scfg.name)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=examples,
        eval_dataset=eval_examples,
        data_collator=_collator(cfg, sides.tokenizer, cross_tok),
        processing_class=sides.tokenizer,
        teacher=teacher,
        losses=[LossSpec(t.name, t.weight, t.temperature, t.params) for t in cfg.train.losses],
        sparse_mode=cfg.train.sparse_mode,
        scale_temperature=cfg.train.scale_temperature,
        chunk_size=loss_chunk_size(cfg.train.chunk_size),
        fused=cfg.train.fused,
        vocab_size=len(sides.tokenizer),
        projections=hidden_projections(cfg, student, teacher) if names & HIDDEN_LOSSES else None,
        onpolicy=cfg.train.onpolicy if cfg.train.onpolicy.lmbda > 0 else None,
        scorer=scorer,
        cross_tokenizer=sides.cross,
    )
    trainer.add_callback(mark_complete())
    if args.disable_tqdm:
        trainer.add_callback(trainer_callback(f"train {scfg.name}"))
    if cfg.train.early_stopping.enabled:
        trainer.add_callback(early_stopping(cfg.train.early_stopping))
    result, resume, runtime = _fit(trainer, cfg, args.output_dir)
    with disk_errors(out, f"checkpoints already written in {args.output_dir} are kept"):
        _save_outputs(trainer, out, sides.tokenizer, cfg, scfg, info, examples, result, runtime, resume)
    trainer.accelerator.wait_for_everyone()
    return out


def _pass_tokens(examples) -> int | None:
    """Tokens in one pass over in-memory examples (no padding); None for a streamed store, where counting
    would decode every row (the trainer's tokens_seen covers it)."""
    base = getattr(examples, "dataset", examples)
    if not isinstance(base, list):
        return None
    idx = getattr(examples, "indices", range(len(base)))
    return int(sum(len(base[int(i)]["input_ids"]) for i in idx))


def _save_outputs(trainer, out: Path, tokenizer, cfg: Config, scfg: StudentConfig, info, examples, result,
                  runtime: float, resume: str | None) -> None:
    # every rank calls save_model: under FSDP / DeepSpeed ZeRO-3 gathering the full weights is a collective;
    # only the main process writes files
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        save_prompt_format(out, training_prompt_format(cfg, tokenizer, backend_spec(cfg.teacher.backend).tokenizer_access))
        (out / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        summary = {
            "student": scfg.name,
            **info.as_dict(),
            "signal": cfg.train.signal,
            "losses": [t.model_dump() for t in cfg.train.losses],
            "examples": len(examples),
            "global_steps": trainer.state.global_step,
            # what the trainer's state says was done (the model card reports these, not the config's limits)
            "epochs": trainer.state.epoch,
            "train_tokens": _pass_tokens(examples),
            "tokens_seen": trainer.state.num_input_tokens_seen or None,
            "learning_rate": trainer.args.learning_rate,
            "train_loss": result.training_loss if result is not None else _last_train_loss(trainer.state),
            "train_runtime_s": round(runtime, 2),
            # why training ended, and with early stopping the evaluated step whose weights are the student
            "stop_reason": stop_reason(trainer.state, cfg.train),
            "best_step": trainer.state.best_global_step if trainer.args.load_best_model_at_end else None,
            "best_eval_loss": trainer.state.best_metric if trainer.args.load_best_model_at_end else None,
            "resumed_from": resume,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))


def _last_train_loss(state) -> float | None:
    """The run's final training loss as the Trainer logged it (for a finished training loaded from its checkpoint)."""
    return next((e["train_loss"] for e in reversed(state.log_history) if "train_loss" in e), None)


def train(config: Config | str | Path | dict, overrides: list[str] | None = None) -> list[Path]:
    """Train every student of the config; returns their directories."""
    cfg = _as_config(config, overrides)
    preflight(cfg, ("train",))  # a bad teacher path or layer count fails before any student loads
    if int(os.environ.get("RANK", "0")) == 0:
        with disk_errors(cfg.run_dir):
            save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    return [train_student(cfg, s) for s in cfg.all_students()]
