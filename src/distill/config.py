"""One typed schema for every stage, loaded from YAML with dotted command-line overrides.

Run as: `distill train cfg.yaml train.learning_rate=3e-4 student.num_layers=2`

Every section forbids unknown keys, so a typo is an error that names the key instead of a silently ignored
setting. The resolved config is written into the run directory by each stage (`save_config`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TeacherConfig(Section):
    """Where teacher outputs come from."""

    model: str | None = Field(None, description="HF hub id, local directory or .gguf file; or the served model name")
    backend: Literal["hf", "openai", "vllm"] = Field("hf", description="hf | openai | vllm")
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
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM memory fraction")


class DataConfig(Section):
    """How prompts are read from files and rendered for the models."""

    prompt_field: str = Field("prompt", description="field with the prompt text")
    messages_field: str = Field("messages", description="field with chat messages (used when present)")
    reference_field: str | None = Field("answer", description="optional reference answer carried to eval")
    id_field: str | None = Field(None, description="optional stable id field")
    chat_template: bool = Field(True, description="use the tokenizer's chat template when it has one")
    system_prompt: str | None = Field(None, description="system message prepended to every prompt")
    split: str = Field("train", description="split name for Hugging Face datasets")


class GenerateConfig(Section):
    """Teacher generation into the store."""

    input: str | None = Field(None, description="prompts: .jsonl/.json/.parquet/.csv or hf:NAME")
    store: str = Field("teacher", description="store directory, relative to run_dir unless absolute")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=list, description="stop strings")
    top_k: int = Field(0, ge=0, description="top-k logprobs captured per completion token (0: none)")
    batch_size: int = Field(16, ge=1)
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
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict, description="extra loss arguments (beta, alpha, ...)")


class LoraSettings(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field("all-linear")


class StudentConfig(Section):
    """How the student is built."""

    name: str = Field("student", description="name in reports and the output directory")
    init: Literal["prune", "config", "lora", "pretrained"] = Field(
        "prune", description="prune the teacher | fresh from a config | LoRA on a base | a pretrained model"
    )
    model: str | None = Field(None, description="base model for lora/pretrained (default: the teacher)")
    num_layers: int | None = Field(None, ge=1, description="prune: keep this many evenly spaced layers")
    layers: list[int] | None = Field(None, description="prune: exact teacher layer indices to keep")
    config: dict[str, Any] = Field(default_factory=dict, description="config: overrides of the teacher's config")
    lora: LoraSettings = Field(default_factory=LoraSettings)
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


class TrainConfig(Section):
    """Student training; any TrainingArguments field can go in `args`."""

    signal: Literal["online", "offline", "none"] = Field(
        "online", description="online: live teacher logits | offline: top-k from the store | none: labels only"
    )
    input: str | None = Field(None, description="training data (default: the teacher store's responses)")
    store: str | None = Field(None, description="teacher store for offline signal (default: generate.store)")
    text_field: str = Field("text", description="field with plain text for online training on raw text")
    response_field: str = Field("response", description="field with the response for prompt/response data")
    losses: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="forward_kl")])
    sparse_mode: Literal["tail", "renormalize"] = Field("tail", description="how top-k teachers treat the rest")
    scale_temperature: bool = Field(True, description="multiply divergences by T^2")
    chunk_size: int | None = Field(
        None, ge=0, description="tokens per loss chunk; None: 1024 when the vocabulary is >= 32k, else off; 0: off"
    )
    max_length: int = Field(512, ge=8)
    learning_rate: float = Field(5e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1)
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler_type: str = "linear"
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = 2
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="held-out fraction for eval loss during training")
    resume: bool = Field(True, description="resume from the last checkpoint in the run directory")
    report_to: list[str] = Field(default_factory=lambda: ["none"])
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch default)")
    args: dict[str, Any] = Field(default_factory=dict, description="extra transformers.TrainingArguments")
    onpolicy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    cot: CotConfig = Field(default_factory=CotConfig)

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, terms: list[LossTerm]) -> list[LossTerm]:
        from distill.losses import LOSSES  # local import: config must stay importable on its own

        for i, term in enumerate(terms):
            if term.name not in LOSSES:
                hint = difflib.get_close_matches(term.name, list(LOSSES), n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ValueError(f"losses[{i}].name: unknown loss '{term.name}' (known: {', '.join(LOSSES)}){extra}")
        if not terms:
            raise ValueError("at least one loss term is needed")
        return terms


class EvalConfig(Section):
    """Teacher vs students on held-out prompts."""

    input: str | None = Field(None, description="held-out prompts with references")
    limit: int | None = Field(None, ge=1)
    metric: str = Field("exact_match", description="exact_match | accuracy | rouge_l | module:function")
    answer_regex: str = Field(r"answer is\s*(-?[\d.,]+)", description="extracts the answer for exact_match")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1)
    latency_requests: int = Field(10, ge=1, description="batch-1 generations timed for p50/p95")
    cost_per_hour: float = Field(1.0, ge=0, description="$ per hour of the serving machine")
    latency_new_tokens: int = Field(32, ge=1, description="fixed new tokens per timed generation (latency, tokens/s)")
    measure_memory: bool = Field(True, description="peak memory (CPU: RSS in a fresh subprocess; CUDA: allocator)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N for every evaluated model")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16 for every evaluated model")
    samples: int = Field(5, ge=0, description="prompts whose outputs are kept in results.json and the report")


class Config(Section):
    """The whole pipeline: teacher → store → student → eval → report."""

    run_dir: str = Field("runs/default", description="every artifact of the run goes here")
    seed: int = 0
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    students: list[StudentConfig] = Field(default_factory=list, description="several students for `distill run`")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _unique_student_names(self) -> "Config":
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

    def all_students(self) -> list[StudentConfig]:
        return list(self.students) if self.students else [self.student]

    def train_for(self, student: StudentConfig) -> "TrainConfig":
        """The train section with this student's overrides applied (validated like the section itself)."""
        if not student.train:
            return self.train
        return TrainConfig.model_validate({**self.train.model_dump(mode="json"), **student.train})

    def for_student(self, student: StudentConfig) -> "Config":
        """This config as one student's training sees it (student set, train overrides applied)."""
        return self.model_copy(update={"train": self.train_for(student), "student": student})

    def path(self, p: str | None) -> Path | None:
        """Resolve a path relative to run_dir (absolute paths are kept)."""
        if p is None:
            return None
        q = Path(p)
        return q if q.is_absolute() else Path(self.run_dir) / q


# ---------------------------------------------------------------- loading


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
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _section_for(e["loc"][:-1])
            known = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            msg = f"unknown key; expected one of: {', '.join(known)}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
        else:
            msg = e["msg"]
            if "input" in e and e["type"] != "missing":
                msg += f" (got {e['input']!r})"
        lines.append(f"  {loc or '<root>'}: {msg}")
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
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
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
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
