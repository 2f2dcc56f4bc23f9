"""One typed schema for every stage, loaded from YAML with dotted command-line overrides.

Run as: `distill train cfg.yaml train.learning_rate=3e-4 student.num_layers=2`

Every section forbids unknown keys, so a typo is an error that names the key instead of a silently ignored
setting. The resolved config is written into the run directory by each stage (`save_config`).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from distill.errors import ConfigError, not_found, short_repr, write_atomic
from distill.evaluation.metrics import METRICS, check_metric_name  # stdlib only: config stays light

STUDENT_CONFIG_FILE = "train_config.yaml"  # each student's resolved view, in run_dir/students/NAME
INT64_MAX = 2**63 - 1  # integers past this overflow torch, numpy and Arrow; none is a sane setting
SEED_MAX = 2**32 - 1  # numpy's seed range


def number_problem(value: Any, key: str = "") -> str | None:
    """'key: why' for the first non-finite float or out-of-range integer in value (dicts and lists walked,
    so free-form settings such as extra_body or loss params are covered); None when all numbers are sane."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}: not a finite number (got {value}); give a finite value"
    if isinstance(value, int) and abs(value) > INT64_MAX:
        return f"{key}: {short_repr(value, 40)} is out of range (beyond +-2^63); give a sane value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = number_problem(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}")
        if found:
            return found
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _sane_numbers(cls, value: Any, info) -> Any:
        """inf / nan (a learning rate of inf trains an all-NaN student with exit 0) and integers past int64 (a seed
        of 1e23) are refused in every field of every section, free-form dicts included."""
        problem = number_problem(value, info.field_name)
        if problem:
            raise ValueError(problem)
        return value


class TeacherConfig(Section):
    """Where teacher outputs come from."""

    model: str | None = Field(None, description="HF hub id, local directory or .gguf file; or the served model name")
    backend: str = Field("hf", description="a backend of distill.teachers.registry: hf | openai | vllm")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = Field(False, description="run model code from the checkpoint (only if you trust it)")
    base_url: str | list[str] | None = Field(None, description="OpenAI-compatible endpoint(s); a list spreads load")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    api: Literal["chat", "completions"] = Field("chat", description="OpenAI endpoint flavour")
    max_concurrency: int = Field(8, ge=1, description="concurrent requests to the endpoint(s)")
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    max_retries: int = Field(6, ge=0, description="retries on 429/5xx/connection errors")
    retry_base_delay: float = Field(1.0, ge=0, description="seconds before the first retry; doubles each retry")
    retry_max_delay: float = Field(60.0, ge=0, description="cap on one backoff delay (Retry-After wins)")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields sent to the endpoint")
    tokenizer: str | None = Field(
        None, description="openai backend: the served model's tokenizer (hub id or directory); the store then gets "
        "prompt ids and token strings mapped to ids, so train.signal=offline works for a student sharing it")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM memory fraction")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        # a local import, as for losses: config stays importable on its own
        from distill.teachers.registry import backend_spec

        backend_spec(name)  # raises with the known names and a did-you-mean
        return name


class DataConfig(Section):
    """How prompts are read from files and rendered for the models."""

    prompt_field: str = Field("prompt", description="field with the prompt text")
    messages_field: str = Field("messages", description="field with chat messages (used when present)")
    reference_field: str | None = Field("answer", description="optional reference answer carried to eval")
    id_field: str | None = Field(None, description="optional stable id field")
    chat_template: bool = Field(True, description="use the tokenizer's chat template when it has one")
    system_prompt: str | None = Field(None, description="system message prepended to every prompt")
    split: str = Field("train", description="split name for Hugging Face datasets")
    truncate: bool = Field(
        False, description="generate: cut prompts longer than the teacher's context (minus room for "
        "generate.max_new_tokens, at most half of it) from the start and count them, instead of refusing them"
    )


class GenerateConfig(Section):
    """Teacher generation into the store."""

    input: str | None = Field(None, description="prompts: .jsonl/.json/.parquet/.csv or hf:NAME")
    store: str = Field("teacher", description="store directory, relative to run_dir unless absolute")
    max_new_tokens: int = Field(256, ge=1, description="most tokens the teacher generates per prompt")
    temperature: float = Field(0.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest token set with this mass")
    seed: int = Field(0, description="sampling seed (greedy outputs do not depend on it)")
    stop: list[str] = Field(default_factory=list, description="stop strings")
    top_k: int = Field(0, ge=0, description="top-k logprobs captured per completion token (0: none)")
    batch_size: int = Field(16, ge=1, description="prompts generated together (local backends)")
    shard_rows: int = Field(256, ge=1, description="rows per Parquet shard (the most a crash can lose)")
    limit: int | None = Field(None, ge=1, description="only the first N prompts")
    shard: str | None = Field(None, description="'i/n': this worker takes every n-th prompt from i")
    reasoning: bool = Field(False, description="ask for reasoning and keep it apart from the answer")
    reasoning_prompt: str = Field(
        "\n\nThink step by step, then give the final answer after 'Answer:'.",
        description="reasoning: appended to each prompt (the last user message of a chat)",
    )
    answer_marker: str = Field("Answer:", description="reasoning: the text that separates reasoning from the answer")


class LossTerm(Section):
    """One weighted component of the training objective."""

    name: str = Field(..., description="a key of distill.losses.LOSSES, e.g. forward_kl, jsd, cross_entropy")
    weight: float = Field(1.0, ge=0, description="weight of this term in the summed loss")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T on both sides (divergences)")
    params: dict[str, Any] = Field(
        default_factory=dict, description="the loss's typed parameters (jsd: beta; skew_*: alpha; ...), checked at load"
    )


class LoraSettings(Section):
    """PEFT LoRA adapter settings for student.init=lora."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | str = Field("all-linear", description="module names to adapt, or 'all-linear'")


class StudentConfig(Section):
    """How the student is built."""

    name: str = Field("student", description="name in reports and the output directory")
    init: Literal["prune", "minitron", "config", "lora", "pretrained"] = Field(
        "prune",
        description="prune the teacher's layers | minitron: prune width and depth by importance | fresh from a "
        "config | LoRA on a base | a pretrained model",
    )
    model: str | None = Field(None, description="base model for lora/pretrained (default: the teacher)")
    num_layers: int | None = Field(None, ge=1, description="prune: keep this many evenly spaced layers")
    layers: list[int] | None = Field(None, description="prune: exact teacher layer indices to keep")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="config: overrides of the teacher's config | minitron: sizes to prune to (hidden_size, "
        "intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers)",
    )
    target_params: int | None = Field(
        None, ge=1, description="minitron: parameter budget; the widths not given in config shrink to fit it"
    )
    calibration: str | None = Field(
        None, description="minitron: prompts file ranking the teacher's units (default: generate.input, train.input)"
    )
    calibration_samples: int = Field(256, ge=1, description="minitron: how many calibration prompts are used")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="init=lora: adapter settings")
    train: dict[str, Any] = Field(
        default_factory=dict, description="this student's overrides of the train section (signal, input, losses, ...)"
    )


class OnPolicyConfig(Section):
    """On-policy distillation (GKD): a fraction lmbda of batches is sampled from the student and scored by the teacher."""

    lmbda: float = Field(0.0, ge=0, le=1, description="fraction of batches the student generates itself (0: off)")
    max_new_tokens: int = Field(64, ge=1, description="tokens the student samples per prompt")
    temperature: float = Field(1.0, gt=0, description="student sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="student nucleus sampling")
    start_step: int = Field(0, ge=0, description="sample only from this optimizer step on: an offline phase first "
                            "(GKD starts from a fine-tuned student; a fresh one samples noise)")


class CotConfig(Section):
    """Chain-of-thought distillation (Distilling step-by-step) from a store with a reasoning column."""

    mode: Literal["off", "two_task", "trace"] = Field(
        "off", description="two_task: answer and rationale tasks selected by a prompt prefix | trace: whole trace"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="two_task: weight of the answer task (1 - alpha: rationale)")
    answer_prefix: str = Field("[answer] ", description="two_task: prompt prefix that asks for the bare answer")
    rationale_prefix: str = Field("[rationale] ", description="two_task: prompt prefix that asks for the reasoning")
    rationale_with_answer: bool = Field(True, description="two_task: the rationale target ends with the answer")
    inference: Literal["answer", "rationale"] = Field(
        "rationale", description="two_task: which task prefix the trained student is prompted with at inference"
    )


class EarlyStoppingConfig(Section):
    """Train until the held-out loss stops improving (train.eval_fraction's split, evaluated every
    train.eval_steps); the checkpoint with the lowest held-out loss becomes the student. `early_stopping: true`
    is short for `{enabled: true}`."""

    enabled: bool = Field(
        False, description="stop when the held-out loss has not improved for `patience` evaluations (max_steps or "
        "num_train_epochs stay the ceiling); a checkpoint is written at every evaluation (train.save_steps is "
        "ignored) and the best one is saved as the student"
    )
    patience: int = Field(3, ge=1, description="evaluations in a row without an improvement before training stops")
    min_delta: float = Field(
        0.0, ge=0, description="an evaluation improves only when its loss is more than this below the best so far"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


class TrainConfig(Section):
    """Student training; any TrainingArguments field can go in `args`."""

    signal: Literal["online", "offline", "none"] = Field(
        "online", description="online: live teacher logits | offline: top-k from the store | none: labels only"
    )
    input: str | None = Field(None, description="training data (default: the teacher store's responses)")
    store: str | None = Field(None, description="teacher store for offline signal (default: generate.store)")
    text_field: str = Field("text", description="field with plain text for online training on raw text")
    response_field: str = Field("response", description="field with the response for prompt/response data")
    losses: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="forward_kl")],
                                   description="weighted loss terms summed into the objective")
    sparse_mode: Literal["tail", "renormalize"] = Field("tail", description="how top-k teachers treat the rest")
    scale_temperature: bool = Field(True, description="multiply divergences by T^2")
    chunk_size: int | None = Field(
        None, ge=0, description="tokens per loss chunk; None: 1024 (fewer at large vocabularies: 8M logits at most, "
        "55 tokens at 152k), as DistillationTrainer's default; 0: off"
    )
    fused: bool = Field(
        True, description="project hidden states through lm_head inside the loss (counted tokens only, per chunk)"
    )
    max_length: int = Field(512, ge=8, description="most tokens per training example (prompt + response)")
    learning_rate: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    num_train_epochs: float = Field(1.0, gt=0, description="passes over the data (max_steps wins when > 0)")
    max_steps: int = Field(-1, description="optimizer steps to train; -1: use num_train_epochs")
    per_device_train_batch_size: int = Field(8, ge=1, description="examples per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of the steps with a linear LR warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler: linear | cosine | constant | ...")
    logging_steps: int = Field(10, ge=1, description="log the losses every N steps")
    save_steps: int = Field(500, ge=1, description="write a checkpoint every N steps (resume starts there)")
    save_total_limit: int | None = Field(2, description="checkpoints kept (older ones are deleted); None: all")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="held-out fraction for eval loss during training")
    eval_steps: int | None = Field(
        None, ge=1, description="held-out loss every N steps (needs eval_fraction > 0; default: logging_steps)"
    )
    resume: bool = Field(True, description="resume from the last checkpoint in the run directory")
    report_to: list[str] = Field(default_factory=lambda: ["none"],
                                 description="trackers: none | tensorboard | mlflow | wandb | ...")
    threads: int | None = Field(None, ge=1, le=4096, description="torch CPU threads (None: torch default)")
    args: dict[str, Any] = Field(default_factory=dict, description="extra transformers.TrainingArguments")
    onpolicy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="on-policy distillation (GKD)")
    cot: CotConfig = Field(default_factory=CotConfig, description="chain-of-thought distillation")
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="train until the held-out loss stops improving"
    )

    @field_validator("early_stopping")
    @classmethod
    def _early_stopping_needs_held_out(cls, es: EarlyStoppingConfig, info: ValidationInfo) -> EarlyStoppingConfig:
        # refused rather than defaulted: a split takes examples out of training, which the user should choose
        if es.enabled and info.data.get("eval_fraction", 1.0) == 0:
            raise ValueError("needs a held-out split whose loss decides when to stop: set train.eval_fraction "
                             "(e.g. 0.1), or train.early_stopping.enabled=false")
        return es

    @field_validator("args")
    @classmethod
    def _typed_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        return coerce_training_args(args) if args else args

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, terms: list[LossTerm]) -> list[LossTerm]:
        from distill.losses import LOSSES  # local import: config must stay importable on its own

        for i, term in enumerate(terms):
            if term.name not in LOSSES:
                hint = difflib.get_close_matches(term.name, list(LOSSES), n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ValueError(f"losses[{i}].name: unknown loss '{term.name}' (known: {', '.join(LOSSES)}){extra}")
            try:  # each loss's typed parameters (distill.losses.registry): unknown keys and ranges, named
                LOSSES[term.name].parse_params(term.params)
            except (TypeError, ValueError) as err:
                raise ValueError(f"losses[{i}].params.{err}") from None
        if not terms:
            raise ValueError("at least one loss term is needed")
        return terms


def coerce_training_args(args: dict[str, Any]) -> dict[str, Any]:
    """`train.args` parsed against transformers.TrainingArguments' field types: '1e-3' (YAML 1.1 reads it as a
    string) becomes 0.001 for learning_rate; a key that is no field, or a value of the wrong type, names the key."""
    import dataclasses
    import typing

    from pydantic import TypeAdapter
    from transformers import TrainingArguments  # only when train.args is used

    hints = typing.get_type_hints(TrainingArguments)
    names = [f.name for f in dataclasses.fields(TrainingArguments)]
    out = {}
    for key, value in args.items():
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ValueError(f"train.args.{key}: not a transformers.TrainingArguments field{extra}")
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # noqa: BLE001 - a type pydantic cannot check: passed through as given
            out[key] = value
            continue
        try:
            out[key] = adapter.validate_python(value)
        except ValidationError:
            raise ValueError(f"train.args.{key}: expected {type_name(hints[key])}, got {value!r}") from None
    return out


def type_name(ann: Any) -> str:
    """A readable type: 'int | None', 'hf | openai | vllm', 'list[str]'."""
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


class EvalConfig(Section):
    """Teacher vs students on held-out prompts."""

    input: str | None = Field(None, description="held-out prompts with references")
    limit: int | None = Field(None, ge=1, description="only the first N held-out prompts")
    metric: str = Field(
        "exact_match", description=f"{' | '.join(METRICS)} (distill.evaluation.metrics.METRICS) | module:function"
    )
    answer_regex: str = Field(r"answer is\s*(-?[\d.,]+)", description="extracts the answer for exact_match")
    max_new_tokens: int = Field(128, ge=1, description="most tokens each model generates per held-out prompt")
    batch_size: int = Field(16, ge=1, description="prompts generated together")
    latency_requests: int = Field(10, ge=1, description="batch-1 generations timed for p50/p95")
    latency_passes: int = Field(
        3, ge=1, description="timed passes over the latency requests; their spread flags a noisy machine"
    )
    cost_per_hour: float = Field(1.0, ge=0, description="$ per hour of the serving machine")
    latency_new_tokens: int = Field(32, ge=1, description="fixed new tokens per timed generation (latency, tokens/s)")
    measure_memory: bool = Field(True, description="peak memory (CPU: RSS in a fresh subprocess; CUDA: allocator)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N for every evaluated model")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16 for every evaluated model")
    samples: int = Field(5, ge=0, description="prompts whose outputs are kept in results.json and the report")
    speculative_prompts: int = Field(
        8, ge=0, description="held-out prompts on which each student (same vocabulary) drafts for the teacher "
        "(speculative decoding: acceptance, speedup, identical greedy output); 0: off"
    )
    group_field: str | None = Field(
        "group", description="eval-data field whose values group the error breakdown (e.g. 1-step / 2-step)"
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, spec: str) -> str:
        return check_metric_name(spec)  # a typo fails at config load, with a did-you-mean


class Config(Section):
    """The whole pipeline: teacher → store → student → eval → report."""

    run_dir: str = Field("runs/default", description="every artifact of the run goes here")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed for training (init, shuffling) and data splits")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="where teacher outputs come from")
    data: DataConfig = Field(default_factory=DataConfig, description="how prompts are read and rendered")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="teacher generation into the store")
    student: StudentConfig = Field(default_factory=StudentConfig, description="the student (one-student runs)")
    students: list[StudentConfig] = Field(default_factory=list, description="several students for `distill run`")
    train: TrainConfig = Field(default_factory=TrainConfig, description="student training")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="teacher vs students on held-out prompts")

    @model_validator(mode="after")
    def _unique_student_names(self) -> Config:
        names = [s.name for s in self.all_students()]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"students: names must be unique, repeated: {sorted(dupes)}")
        for s in self.all_students():
            try:
                self.train_for(s)
            except ValidationError as err:
                where = f"student '{s.name}' train override"
                raise ValueError(_format_errors(err, where).replace("\n  ", "\n  train.")) from None
        return self

    @model_validator(mode="after")
    def _hidden_losses_need_a_live_teacher(self) -> Config:
        """Hidden-state losses compare the teacher's hidden states on every batch: only a live local teacher
        has them (a store keeps top-k logprobs, an endpoint returns none). Refused here, before any work."""
        for s in self.all_students():
            check_hidden_losses(self.train_for(s), self.teacher, f"student '{s.name}': " if self.students else "")
        return self

    def all_students(self) -> list[StudentConfig]:
        return list(self.students) if self.students else [self.student]

    def train_for(self, student: StudentConfig) -> TrainConfig:
        """The train section with this student's overrides applied (validated like the section itself)."""
        if not student.train:
            return self.train
        return TrainConfig.model_validate({**self.train.model_dump(mode="json"), **student.train})

    def for_student(self, student: StudentConfig) -> Config:
        """This config as one student's training sees it (student set, train overrides applied)."""
        return self.model_copy(update={"train": self.train_for(student), "student": student})

    def path(self, p: str | None) -> Path | None:
        """Resolve a path relative to run_dir (absolute paths are kept)."""
        if p is None:
            return None
        q = Path(p)
        return q if q.is_absolute() else Path(self.run_dir) / q


def check_hidden_losses(train: TrainConfig, teacher: TeacherConfig, where: str = "") -> None:
    """Hidden losses need train.signal=online with a backend that has local weights, and one layer_map (a
    list of [student, teacher] hidden-state index pairs) shared by every hidden loss (one set of projections)."""
    from distill.losses import HIDDEN_LOSSES  # local imports: config stays importable on its own
    from distill.teachers.registry import backend_spec

    terms = [(i, t) for i, t in enumerate(train.losses) if t.name in HIDDEN_LOSSES]
    if not terms:
        return
    i, first = terms[0]
    if train.signal != "online":
        raise ValueError(
            f"{where}train.losses[{i}]: {first.name} needs the teacher's hidden states on every batch, which "
            f"train.signal={train.signal} does not give (a store keeps top-k logprobs only); use train.signal=online "
            "with a local teacher, or drop the hidden-state loss"
        )
    if not backend_spec(teacher.backend).local_weights:
        raise ValueError(
            f"{where}train.losses[{i}]: {first.name} needs a teacher whose weights load here (hidden states); "
            f"teacher.backend={teacher.backend} has none: use a local backend such as hf"
        )
    # each layer_map's shape is checked by the loss's typed params (distill.losses.hidden.HiddenParams)
    maps = [None if t.params.get("layer_map") is None else [list(p) for p in t.params["layer_map"]] for _, t in terms]
    if any(m != maps[0] for m in maps):
        raise ValueError(f"{where}train.losses: every hidden-state loss must use the same layer_map (they share "
                         f"one set of learned projections), got {maps}")


# ---------------------------------------------------------------- discovery (`distill config`)


def _backend_names() -> list[str]:
    from distill.teachers.registry import BACKENDS  # local: the teachers package imports this module

    return list(BACKENDS)


# settings typed as str but checked against a registry: `distill config` shows the registered names
CHOICES = {"teacher.backend": _backend_names}


def describe(section: str | None = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every setting, or those under `section` ('train',
    'train.onpolicy'); list items show as 'train.losses[].name'."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = info.annotation
            inner = [a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner and ann is inner[0]:  # a nested section
                walk(inner[0], key + ".")
                continue
            if info.is_required():
                shown = "(required)"
            else:
                default = info.get_default(call_default_factory=True)
                shown = yaml.safe_dump(_plain(default), default_flow_style=True, width=10_000).strip()
                shown = shown.removesuffix("...").strip()
            shown_type = " | ".join(CHOICES[key]()) if key in CHOICES else type_name(ann)
            rows.append((key, shown_type, shown, info.description or ""))
            if inner and name != "students":  # list of sections: their item keys
                walk(inner[0], key + "[].")

    walk(Config, "")
    at = next(i for i, r in enumerate(rows) if r[0] == "train.losses[].params") + 1
    rows[at:at] = _loss_param_rows()
    if section:
        picked = [r for r in rows if r[0] == section or r[0].startswith(section + ".") or
                  r[0].startswith(section + "[]")]
        if not picked:
            known = sorted({r[0].split(".")[0] for r in rows})
            hint = difflib.get_close_matches(section, known, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"no config section or key '{section}'; sections: {', '.join(known)}{extra}")
        rows = picked
    return rows


def _loss_param_rows() -> list[tuple[str, str, str, str]]:
    """One row per typed loss parameter (distill.losses' registry), naming the losses that take it."""
    from distill.losses import LOSSES, describe_params  # local: config stays importable on its own

    seen: dict[tuple[str, str, str, str], list[str]] = {}
    for name in LOSSES:
        for key, type_, default, desc in describe_params(name):
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            seen.setdefault((f"train.losses[].params.{key}", type_, shown, desc), []).append(name)
    return [(k, t, d, f"{desc} ({', '.join(names)})") for (k, t, d, desc), names in seen.items()]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- loading

MAX_YAML_VALUES = 1_000_000  # values a YAML document may expand to through its aliases


class YamlBombError(yaml.YAMLError):
    """Aliases that expand past MAX_YAML_VALUES values, or that contain themselves."""


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand to more than MAX_YAML_VALUES values: a
    'billion laughs' document is a few hundred bytes, but copying and validating its tree takes gigabytes and
    never ends. The composed node graph is measured (shared nodes counted once per use) before anything is built."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` becomes once every alias is expanded; raises YamlBombError past the bound."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise YamlBombError(f"line {node.start_mark.line + 1}: an alias refers to the list or mapping that holds it "
                            "(a recursive value); write the value out")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    open_.discard(key)
    if size > MAX_YAML_VALUES:
        raise YamlBombError(f"line {node.start_mark.line + 1}: aliases (*name) expand to more than "
                            f"{MAX_YAML_VALUES:,} values (an alias bomb?); write the values out")
    sizes[key] = size
    return size


def read_yaml(path: Path) -> Any:
    """A YAML file's content; every way it can be unreadable is one ConfigError line naming the file."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}" if not path.is_symlink() else not_found(path, "config file"))
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a config file; give a .yaml file")
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise ConfigError(f"{path}: a binary file (NUL bytes), not a YAML config; give a .yaml text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); a YAML config is UTF-8 "
                          "text: re-save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=BoundedLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:  # YamlBombError and the reader's errors
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; a config is a few levels of sections") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits (Python's int conversion limit)
        why = "a number of more than 4,300 digits" if "digits" in str(exc) else str(exc).split(";")[0]
        raise ConfigError(f"{path}: a value cannot be read: {why}; give a sane value") from None



def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if k.isdigit() and isinstance(node, list):
            node = node[int(k)]
            continue
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override '{dotted}': '{k}' is a value, not a section")
        node = nxt
    last = keys[-1]
    if isinstance(node, list) and last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings to (key, value); values parse as YAML (numbers, lists, bools)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.learning_rate=3e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = yaml.load(raw, Loader=BoundedLoader) if raw.strip() else ""
        except (yaml.YAMLError, ValueError, RecursionError):
            value = raw
        out.append((key, value))
    return out


MAX_ERRORS = 10  # a 10,000-item list of wrong values is 10 lines and a count, not 10,000 lines


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    errors = err.errors()
    if len(errors) > MAX_ERRORS:
        lines[0] = f"invalid config ({source}), {len(errors)} errors, the first {MAX_ERRORS}:"
    for e in errors[:MAX_ERRORS]:
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _section_for(e["loc"][:-1])
            known = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            msg = f"unknown key; expected one of: {', '.join(known)}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
        elif e["type"] == "value_error" and e["loc"] and str(e["ctx"]["error"]).startswith(
                (f"{e['loc'][-1]}[", f"{e['loc'][-1]}.", f"{e['loc'][-1]}:")):
            # a validator that names the item itself ("losses[0].params.betaa: ..."): print that key
            head, _, msg = str(e["ctx"]["error"]).partition(": ")
            loc = ".".join([*(str(p) for p in e["loc"][:-1]), head])
        elif e["type"] == "value_error":  # our validators' messages say what was wrong and name the key
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
        else:
            msg = e["msg"]
            if "input" in e and e["type"] != "missing" and e["loc"]:  # not the whole tree for a root error
                msg += f" (got {short_repr(e['input'])})"
        lines.append(f"  {msg}" if loc and msg.startswith(loc + ".") else f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or [])]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def load_config(
    path: str | Path | dict | None = None, overrides: list[str] | None = None, **sections: Any
) -> Config:
    """Load a Config from a YAML file (or a dict), then apply dotted overrides.

    `load_config("cfg.yaml", ["train.learning_rate=3e-4"])`; keyword sections update the tree too.
    """
    source = "defaults"
    tree: dict = {}
    if isinstance(path, dict):
        tree, source = dict(path), "dict"
    elif path is not None:
        p = Path(path)
        tree = read_yaml(p)
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top, got {type(tree).__name__}")
        source = str(p)
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy with plain types
    for k, v in sections.items():
        tree[k] = v
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    if overrides:
        source += " + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config (every default filled in) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
