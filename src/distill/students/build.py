"""Building the student: from a config, by pruning the teacher's layers, as a LoRA adapter, or pretrained.

Pruning copies the kept layers' weights (evenly spaced by default, first and last kept), the way DistilBERT
was initialised from BERT: the student starts close to the teacher instead of from noise.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field

import torch

from distill.config import StudentConfig
from distill.modeling import count_parameters, load_model
from distill.students.shapes import check_shape

# Attribute paths of the decoder-layer ModuleList and the config field holding the layer count, per family.
_LAYER_LISTS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers")
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class StudentInfo:
    """What was built, for logs, summaries and the report."""

    init: str
    teacher_params: int | None
    student_params: int
    trainable_params: int
    kept_layers: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float | None:
        return None if not self.teacher_params else self.teacher_params / self.student_params

    def as_dict(self) -> dict:
        d = asdict(self)
        d["compression"] = self.compression
        return d


def evenly_spaced(n_teacher: int, n_keep: int) -> list[int]:
    """`n_keep` layer indices spread over `n_teacher`, always keeping the first and the last layer."""
    if not 1 <= n_keep <= n_teacher:
        raise ValueError(f"student.num_layers={n_keep} must be between 1 and the teacher's {n_teacher} layers")
    if n_keep == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_keep - 1)) for i in range(n_keep)})


def _layer_list_path(model: torch.nn.Module) -> str:
    for path in _LAYER_LISTS:
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        if isinstance(node, torch.nn.ModuleList):
            return path
    raise ValueError(
        f"cannot prune {type(model).__name__}: no decoder layer list found at any of {', '.join(_LAYER_LISTS)}; "
        "use student.init=config instead"
    )


def _layer_count_field(config) -> str:
    for name in _LAYER_COUNT_FIELDS:
        if getattr(config, name, None) is not None:
            return name
    raise ValueError(f"{type(config).__name__} has none of {_LAYER_COUNT_FIELDS}; cannot set the layer count")


def prune_layers(teacher: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A new model with only the teacher's layers `keep` (in that order), all weights copied.

    Built fresh from a config with fewer layers and loaded from a re-indexed state dict, so per-layer
    bookkeeping (layer_idx for the KV cache, per-layer config lists) is consistent.
    """
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    n_teacher = getattr(cfg, _layer_count_field(cfg))
    if any(not 0 <= i < n_teacher for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"student.layers={keep}: indices must be distinct and in [0, {n_teacher - 1}]")
    setattr(cfg, _layer_count_field(cfg), len(keep))
    for name, value in list(vars(cfg).items()):  # per-layer lists, e.g. layer_types for sliding windows
        if isinstance(value, list) and len(value) == n_teacher and name != "architectures":
            setattr(cfg, name, [value[i] for i in keep])
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)

    prefix = _layer_list_path(teacher)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"pruning left weights unmatched: missing={missing[:5]} unexpected={unexpected[:5]}")
    return student.to(next(teacher.parameters()).device)


def _params_from_config(path: str) -> int | None:
    """The teacher's parameter count without loading its weights (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    from distill.modeling import load_model_config

    try:
        with torch.device("meta"):
            return count_parameters(AutoModelForCausalLM.from_config(load_model_config(path)))
    except (OSError, ValueError):
        return None


def _derived_head_dim(model_cfg) -> bool:
    """True when the config's head_dim is just hidden_size / num_attention_heads (not a free choice)."""
    head_dim = getattr(model_cfg, "head_dim", None)
    heads = getattr(model_cfg, "num_attention_heads", None)
    hidden = getattr(model_cfg, "hidden_size", None)
    return bool(head_dim and heads and hidden and head_dim * heads == hidden)


def _from_config(cfg: StudentConfig, teacher_path: str | None):
    from transformers import AutoModelForCausalLM

    from distill.modeling import load_model_config

    base = cfg.model or teacher_path
    if base is None:
        raise ValueError("student.init=config needs teacher.model (a local/hub model) or student.model for the base config")
    return AutoModelForCausalLM.from_config(config_student(cfg, load_model_config(base)))


def config_student(cfg: StudentConfig, model_cfg):
    """The base model's config with student.config applied (`init: config`), checked; `model_cfg` is changed.

    Used by the build and by preflight, so a shape the first forward pass would reject is refused before any
    generation."""
    derived_head_dim = _derived_head_dim(model_cfg)
    for key, value in cfg.config.items():
        if not hasattr(model_cfg, key):
            raise ValueError(f"student.config.{key}: {type(model_cfg).__name__} has no field '{key}'")
        setattr(model_cfg, key, value)
    if derived_head_dim and "head_dim" not in cfg.config:
        # the teacher's head_dim was hidden/heads: keep that relation for the new width instead of the old value
        model_cfg.head_dim = model_cfg.hidden_size // model_cfg.num_attention_heads
    if "num_hidden_layers" in cfg.config and isinstance(getattr(model_cfg, "layer_types", None), list):
        model_cfg.layer_types = model_cfg.layer_types[: model_cfg.num_hidden_layers]
    check_shape(model_cfg)
    return model_cfg


def _lora(cfg: StudentConfig, teacher_path: str | None, dtype: str, trust_remote_code: bool):
    from peft import LoraConfig, get_peft_model

    base = cfg.model
    if base is None:
        raise ValueError("student.init=lora needs student.model: the (smaller) base model the adapter trains on")
    model = load_model(base, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    lcfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def fp32_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Cast the parameters that train to float32, in place.

    A student cut from a bf16 teacher (prune, minitron, or `init: config` from its config.json, which says
    bfloat16) would otherwise train in pure bf16: no fp32 master weights, so updates smaller than bf16's
    resolution are lost. Mixed precision stays the user's choice, through the Trainer's autocast
    (`train.args: {bf16: true}`), which keeps fp32 parameters. Frozen weights (a LoRA base) keep their dtype.
    """
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32]
    if params and all(p.requires_grad for p in model.parameters()):
        model.float()
        model.config.dtype = torch.float32  # what save_pretrained writes and from_pretrained reads back
    else:
        for p in params:
            p.data = p.data.float()
    return model


def build_student(
    cfg: StudentConfig,
    teacher: torch.nn.Module | None = None,
    teacher_path: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    calibration: list[list[int]] | None = None,
    pad_id: int | None = None,
) -> tuple[torch.nn.Module, StudentInfo]:
    """The student model and a summary of how it compares to the teacher.

    `teacher` (an already loaded model) is used for pruning and the parameter count; when missing and pruning
    is asked for, it is loaded from `teacher_path` on the CPU. `calibration` (token ids of prompts, padded with
    `pad_id`) ranks the teacher's units for minitron.
    """
    kept, notes = None, []
    if cfg.init in ("prune", "minitron") and teacher is None:
        if teacher_path is None:
            raise ValueError(f"student.init={cfg.init} needs a local teacher (teacher.model)")
        teacher = load_model(teacher_path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    if cfg.init == "minitron":
        from distill.students.minitron import minitron_student

        student, kept, notes = minitron_student(cfg, teacher, calibration, pad_id)
    elif cfg.init == "prune":
        n_teacher = getattr(teacher.config, _layer_count_field(teacher.config))
        if cfg.layers is not None:
            kept = list(cfg.layers)
        else:
            kept = evenly_spaced(n_teacher, cfg.num_layers or max(1, n_teacher // 2))
        student = prune_layers(teacher, kept)
    elif cfg.init == "config":
        student = _from_config(cfg, teacher_path)
    elif cfg.init == "lora":
        student = _lora(cfg, teacher_path, dtype, trust_remote_code)
    else:  # pretrained
        if cfg.model is None:
            raise ValueError("student.init=pretrained needs student.model (a hub id or local path)")
        student = load_model(cfg.model, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)

    fp32_trainable(student)
    if cfg.init == "lora":
        total = count_parameters(student.get_base_model())
    else:
        total = count_parameters(student)
    if teacher is not None:
        teacher_params = count_parameters(teacher)
    elif teacher_path is not None:
        teacher_params = _params_from_config(teacher_path)
    else:
        teacher_params = None
    info = StudentInfo(
        init=cfg.init,
        teacher_params=teacher_params,
        student_params=total,
        trainable_params=count_parameters(student, trainable_only=True),
        kept_layers=kept,
        notes=notes,
    )
    return student, info

