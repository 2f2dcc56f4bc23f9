"""Which config fields change which stage's artifact, field by field, for `distill run`'s fingerprints.

A stage reruns (and a student's checkpoints are deleted) only when a field that changes its artifact changes:
`generate.batch_size`, `teacher.timeout` or `train.logging_steps` change how fast or how verbosely a stage
runs, never what it writes, so they rerun nothing. Every field of the schema is listed below under the stages
it changes (tests/test_pipeline.py fails on an unlisted one), so a new setting is classified when it is added.

Stage tags:
    key       enters the store's row key (teacher identity + `generation_params`): generate hashes the key, so a
              field the key ignores (the seed of greedy decoding) reruns nothing
    generate  which prompts, and where the store is
    train     the student's weights
    eval      eval/results.json
    parts     hashed through its own fields: `students[]` as student.* and each student's `train` overrides as
              train.* (so an override of logging_steps reruns nothing either)
A field with no tag is operational (speed, logging, retries, where a process runs).

Run as: `stage_values(cfg, "train", student)` -> {dotted field: value} hashed into that stage's fingerprint.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from distill.config import Config, StudentConfig

_TAGGED = {
    "parts": "students student.train",
    "": """run_dir
        teacher.device teacher.trust_remote_code teacher.base_url teacher.api_key_env teacher.max_concurrency
        teacher.timeout teacher.max_retries teacher.retry_base_delay teacher.retry_max_delay
        teacher.tensor_parallel_size teacher.gpu_memory_utilization
        generate.batch_size generate.shard_rows generate.shard
        train.logging_steps train.save_steps train.save_total_limit train.eval_steps train.resume train.report_to
        train.threads""",
    "key": """generate.max_new_tokens generate.temperature generate.top_p generate.seed generate.stop
        generate.top_k generate.reasoning generate.reasoning_prompt generate.answer_marker""",
    "key train eval": "teacher.model teacher.backend teacher.api teacher.extra_body teacher.tokenizer",
    "generate train eval": """data.prompt_field data.messages_field data.reference_field data.id_field
        data.chat_template data.system_prompt data.split data.truncate""",
    "generate": "generate.input generate.store generate.limit",
    "train eval": "teacher.dtype",
    "train": """seed student.name student.init student.model student.num_layers student.layers student.config
        student.target_params student.calibration student.calibration_samples student.lora.r student.lora.alpha
        student.lora.dropout student.lora.target_modules
        train.signal train.input train.store train.text_field train.response_field train.losses train.sparse_mode
        train.scale_temperature train.chunk_size train.fused train.max_length train.learning_rate
        train.num_train_epochs train.max_steps train.per_device_train_batch_size train.gradient_accumulation_steps
        train.warmup_ratio train.weight_decay train.lr_scheduler_type train.eval_fraction train.early_stopping.enabled train.early_stopping.patience
        train.early_stopping.min_delta train.args
        train.onpolicy.lmbda train.onpolicy.max_new_tokens train.onpolicy.temperature train.onpolicy.top_p
        train.onpolicy.start_step train.cot.mode train.cot.alpha train.cot.answer_prefix
        train.cot.rationale_prefix train.cot.rationale_with_answer train.cot.inference""",
    "eval": """eval.input eval.limit eval.metric eval.answer_regex eval.max_new_tokens eval.batch_size
        eval.latency_requests eval.latency_passes eval.cost_per_hour eval.latency_new_tokens eval.measure_memory
        eval.device eval.dtype eval.samples eval.group_field
        eval.speculative_prompts""",
}
FIELD_STAGES: dict[str, frozenset[str]] = {
    name: frozenset(tags.split()) for tags, names in _TAGGED.items() for name in names.split()
}
OPERATIONAL = frozenset(name for name, tags in FIELD_STAGES.items() if not tags)

# transformers.TrainingArguments (train.args) that change logging, saving or data loading, never the weights
_OPERATIONAL_ARGS = """
    logging_strategy logging_first_step logging_nan_inf_filter log_level log_level_replica log_on_each_node
    save_strategy save_steps save_total_limit save_only_model save_on_each_node report_to run_name disable_tqdm
    dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor
    dataloader_multiprocessing_context eval_strategy eval_steps eval_delay eval_on_start eval_accumulation_steps
    per_device_eval_batch_size push_to_hub hub_model_id hub_strategy hub_token hub_private_repo hub_revision
    hub_always_push output_dir"""
OPERATIONAL_TRAINING_ARGS = frozenset(_OPERATIONAL_ARGS.split())


def schema_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf field of the schema (a nested section is walked; a list of sections is one field)."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += schema_fields(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def stage_values(cfg: Config, stage: str, student: StudentConfig | None = None) -> dict[str, Any]:
    """{dotted field: value} of every field tagged `stage`; `train.*` and `student.*` as `student` sees them
    (its train overrides applied)."""
    tree = cfg.model_dump(mode="json")
    if student is not None:
        tree["student"] = student.model_dump(mode="json")
        tree["train"] = cfg.train_for(student).model_dump(mode="json")
    values = {name: _lookup(tree, name) for name, tags in FIELD_STAGES.items() if stage in tags}
    if "train.args" in values:
        values["train.args"] = {k: v for k, v in values["train.args"].items() if k not in OPERATIONAL_TRAINING_ARGS}
    return values
