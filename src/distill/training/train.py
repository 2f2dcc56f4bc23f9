"""The training stage: config → student(s) in run_dir/students/NAME with their training logs.

Run as: `distill train cfg.yaml [train.learning_rate=3e-4 ...]` or `distill.train(config)`.

Teacher signal, from `train.signal`:
- online: the teacher model runs next to the student and gives dense logits for every batch;
- offline: top-k ids/logprobs saved by `distill generate` are read from the store (no teacher forward);
- none: labels only (the baseline, or plain sequence-level KD on teacher responses with cross_entropy).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from distill.config import Config, StudentConfig, load_config, save_config
from distill.data.batching import DistillCollator, encode_example, tokenize_pair
from distill.data.prompts import DataError, iter_rows, record_from_row, render_prompt
from distill.modeling import load_model, load_tokenizer_for
from distill.students.build import build_student


def _as_config(config: Config | str | Path | dict, overrides: list[str] | None = None) -> Config:
    if isinstance(config, Config):
        return config if not overrides else load_config(config.model_dump(mode="json"), overrides)
    return load_config(config, overrides)


AUTO_CHUNK, AUTO_CHUNK_VOCAB = 1024, 32768


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def student_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.run_dir) / "students" / name


def store_path(cfg: Config) -> Path:
    return cfg.path(cfg.train.store or cfg.generate.store)


# ---------------------------------------------------------------- examples


def _examples_from_store(cfg: Config, tokenizer, same_tokenizer: bool, want_topk: bool) -> list[dict]:
    from distill.store.shards import read_store

    path = store_path(cfg)
    if not Path(path).exists():
        raise DataError(f"{path}: teacher store not found; run `distill generate` first or set train.store")
    rows = read_store(path)
    if not rows:
        raise DataError(f"{path}: the teacher store has no finished rows")
    out = []
    for row in rows:
        ids_ok = same_tokenizer and row.get("prompt_ids") is not None and row.get("response_ids") is not None
        if ids_ok:
            topk = want_topk and row.get("topk_ids") is not None
            ex = encode_example(
                row["prompt_ids"], row["response_ids"], cfg.train.max_length,
                row["topk_ids"] if topk else None, row["topk_logprobs"] if topk else None,
                row.get("tail") if topk and cfg.train.sparse_mode == "tail" else None,
            )
        else:
            if want_topk:
                raise DataError(
                    f"{path}: row {row.get('index')} has no teacher token ids/top-k for this tokenizer; offline "
                    "logit distillation needs a local teacher with the student's tokenizer (or use cross_entropy)"
                )
            ex = tokenize_pair(tokenizer, row["prompt"], row["response"], cfg.train.max_length)
        if ex is not None:
            out.append(ex)
    if not out:
        raise DataError(f"{path}: every row's prompt is at least train.max_length={cfg.train.max_length} tokens; "
                        "raise train.max_length")
    return out


def _examples_from_file(cfg: Config, tokenizer, source: str) -> list[dict]:
    """Rows with a prompt (or messages) and a response field, or plain text in `train.text_field`."""
    out = []
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
                raise DataError(
                    f"{where}: missing field '{cfg.train.response_field}' (the target response); fields present: "
                    f"{', '.join(row)}. Set train.response_field, or train on the teacher store (train.input unset)"
                )
            ex = tokenize_pair(tokenizer, render_prompt(record, tokenizer, cfg.data), response, cfg.train.max_length)
        if ex is not None:
            out.append(ex)
    if not out:
        raise DataError(f"{source}: no usable training examples: every prompt is at least "
                        f"train.max_length={cfg.train.max_length} tokens; raise train.max_length")
    return out


def build_examples(cfg: Config, tokenizer, same_tokenizer: bool) -> list[dict]:
    offline = cfg.train.signal == "offline"
    if cfg.train.cot.mode != "off":  # chain of thought: two-task or trace examples from reasoning rows
        from distill.data.cot import build_cot_examples

        return build_cot_examples(cfg, tokenizer)
    if cfg.train.input and not offline:
        return _examples_from_file(cfg, tokenizer, cfg.train.input)
    return _examples_from_store(cfg, tokenizer, same_tokenizer, want_topk=offline)


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
        "disable_tqdm": False,
    }
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = t.warmup_ratio
    else:
        kwargs["warmup_steps"] = t.warmup_ratio  # transformers 5: a float < 1 is a ratio
    if t.eval_fraction > 0:
        kwargs.update(eval_strategy="steps", eval_steps=t.save_steps)
    for key, value in t.args.items():
        if key not in fields:
            raise ValueError(f"train.args.{key}: not a transformers.TrainingArguments field")
        kwargs[key] = value
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
        raise ValueError("train.onpolicy with cross-tokenizer losses (uld) is not supported: use one tokenizer")
    if cfg.teacher.backend == "openai":
        from distill.training.onpolicy import OpenAIScorer

        return OpenAIScorer(cfg.teacher)
    if not local_teacher or cfg.train.signal != "online":
        raise ValueError("train.onpolicy needs a teacher to score the student's samples: a local teacher with "
                         "train.signal=online, or teacher.backend=openai (sampled reverse KL)")
    if not names - {"cross_entropy"}:
        raise ValueError("train.onpolicy with a local teacher needs a divergence in train.losses (e.g. reverse_kl): "
                         "cross_entropy is skipped on sampled batches")
    return None


def loss_chunk_size(configured: int | None, vocab: int) -> int | None:
    """Chunk the loss over tokens for large vocabularies unless told otherwise: the plain path holds about ten
    tokens x vocab float32 tensors (8 GB at 4,096 tokens x 49k), the chunked one a fifth of that."""
    if configured is None:
        return AUTO_CHUNK if vocab >= AUTO_CHUNK_VOCAB else None
    return configured or None


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


def train_student(cfg: Config, scfg: StudentConfig) -> Path:
    """Train one student; returns its directory (HF format + train_log.json + train_summary.json)."""
    from distill.training.trainer import (  # transformers.Trainer: import only when training
        DistillationTrainer,
        LossSpec,
    )

    cfg = cfg.for_student(scfg)  # per-student train overrides (e.g. a labels-only baseline next to a KD student)
    from distill.losses import CROSS_TOKENIZER_LOSSES, HIDDEN_LOSSES, check_tokenizers

    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under torchrun / accelerate launch
        save_config(cfg, run_dir / "config.yaml")

    local_teacher = cfg.teacher.backend != "openai" and cfg.teacher.model is not None
    teacher_tok = load_tokenizer_for(cfg.teacher.model, cfg.teacher.trust_remote_code) if local_teacher else None
    if scfg.init in ("lora", "pretrained", "config") and scfg.model:  # config: student.model is its base
        tokenizer = load_tokenizer_for(scfg.model, cfg.teacher.trust_remote_code)
    elif teacher_tok is not None:
        tokenizer = teacher_tok
    else:
        raise ValueError(f"student '{scfg.name}': no tokenizer; set teacher.model (local) or student.model")

    needs_teacher_logits = cfg.train.signal == "online"
    names = {t.name for t in cfg.train.losses}
    if needs_teacher_logits and not local_teacher:
        raise ValueError("train.signal=online needs a local teacher (teacher.backend=hf with teacher.model)")
    same_tokenizer = teacher_tok is not None
    cross = None  # cross-tokenizer mode (distill.data.crosstok): every divergence is a cross-tokenizer loss
    divergences = names - {"cross_entropy"}
    if teacher_tok is not None and needs_teacher_logits and divergences and divergences <= CROSS_TOKENIZER_LOSSES:
        from distill.data.crosstok import CrossTokenizer

        cross = CrossTokenizer.from_tokenizers(tokenizer, teacher_tok)
    elif teacher_tok is not None and tokenizer is not teacher_tok:
        if cfg.train.signal != "none" and names != {"cross_entropy"}:
            check_tokenizers(tokenizer, teacher_tok)  # raises with a pointer to cross-tokenizer mode
        else:
            same_tokenizer = False
    scorer = _check_onpolicy(cfg, local_teacher, names, cross)

    teacher = None
    if needs_teacher_logits or scfg.init == "prune":
        teacher = load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device="cpu",
                             trust_remote_code=cfg.teacher.trust_remote_code)
    student, info = build_student(scfg, teacher=teacher, teacher_path=cfg.teacher.model if local_teacher else None,
                                  trust_remote_code=cfg.teacher.trust_remote_code)
    if not needs_teacher_logits:
        teacher = None  # only needed for pruning: free it before training

    examples = build_examples(cfg, tokenizer, same_tokenizer)
    if cross is not None:
        from distill.data.crosstok import add_teacher_side

        examples = add_teacher_side(examples, tokenizer, teacher_tok, cfg.train.max_length)
    random.Random(cfg.seed).shuffle(examples)
    eval_examples = None
    if cfg.train.eval_fraction > 0:
        n_eval = max(1, int(len(examples) * cfg.train.eval_fraction))
        eval_examples, examples = examples[:n_eval], examples[n_eval:]

    projections = None
    if names & HIDDEN_LOSSES:
        from distill.losses import make_projections

        projections = make_projections(student.config.hidden_size, teacher.config.hidden_size,
                                       student.config.num_hidden_layers + 1)

    out = student_dir(cfg, scfg.name)
    args = _training_args(cfg, out, scfg.name)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=examples,
        eval_dataset=eval_examples,
        data_collator=_collator(cfg, tokenizer, teacher_tok if cross is not None else None),
        processing_class=tokenizer,
        teacher=teacher,
        losses=[LossSpec(t.name, t.weight, t.temperature, t.params) for t in cfg.train.losses],
        sparse_mode=cfg.train.sparse_mode,
        scale_temperature=cfg.train.scale_temperature,
        chunk_size=loss_chunk_size(cfg.train.chunk_size, len(tokenizer)),
        vocab_size=len(tokenizer),
        projections=projections,
        onpolicy=cfg.train.onpolicy if cfg.train.onpolicy.lmbda > 0 else None,
        scorer=scorer,
        cross_tokenizer=cross,
    )
    resume = _last_checkpoint(args.output_dir) if cfg.train.resume else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start

    # every rank calls save_model: under FSDP / DeepSpeed ZeRO-3 gathering the full weights is a collective;
    # only the main process writes files
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        (out / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        summary = {
            "student": scfg.name,
            **info.as_dict(),
            "signal": cfg.train.signal,
            "losses": [t.model_dump() for t in cfg.train.losses],
            "examples": len(examples),
            "global_steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_runtime_s": round(runtime, 2),
            "resumed_from": resume,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    trainer.accelerator.wait_for_everyone()
    return out


def train(config: Config | str | Path | dict, overrides: list[str] | None = None) -> list[Path]:
    """Train every student of the config; returns their directories."""
    cfg = _as_config(config, overrides)
    return [train_student(cfg, s) for s in cfg.all_students()]
