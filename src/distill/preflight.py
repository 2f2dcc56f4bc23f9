"""Checks that need no model weights, run before the first stage so a bad setting fails in a second, not after
hours of generation: model paths exist and are model directories, safetensors headers parse, student layer
counts and config keys fit the teacher's config.json, input files exist.

Run as: `preflight(cfg, stages=("generate", "train", "eval"))` (pipeline.run and training.train call it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.config import Config
from distill.errors import ConfigError
from distill.teachers.registry import backend_spec

LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ('org/name' or 'name')."""
    p = Path(name).expanduser()
    return p.exists() or p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or \
        p.suffix in (".gguf", ".json", ".safetensors")


def check_model(name: str, key: str) -> Any | None:
    """The model's transformers config when `name` is a local model (None for a hub id); a ConfigError naming
    `key` when the path is missing, is a stray file, or holds an unreadable config.json or safetensors file."""
    if not looks_like_path(name):
        return None
    p = Path(name).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {name} does not exist; give a local model directory (config.json + "
                          "*.safetensors), a .gguf file, or a Hugging Face hub id")
    if p.is_file():
        if p.suffix == ".gguf":
            with p.open("rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise ConfigError(f"{key}: {name} is not a GGUF file (no GGUF header)")
            from distill.modeling import load_model_config

            try:  # its architecture, from the metadata: student shapes are checked against it like a directory's
                return load_model_config(p)
            except Exception as exc:  # one line: the file's fault (an architecture transformers cannot read)
                raise ConfigError(f"{key}: {name}: transformers cannot read this GGUF's model config "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
        raise ConfigError(f"{key}: {name} is a file, not a model directory; give the directory that holds "
                          "config.json and *.safetensors (or a .gguf file)")
    config_file = p / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}: {name} has no config.json; expected a Hugging Face model directory "
                          f"(found: {', '.join(sorted(f.name for f in p.iterdir())[:8]) or 'nothing'})")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(str(p))
    except Exception as exc:  # any failure here is the file's, said in one line
        raise ConfigError(f"{key}: {config_file} cannot be read as a model config ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from exc
    check_safetensors(p, key)
    return model_config


def check_safetensors(directory: Path, key: str) -> None:
    """Every *.safetensors header parses (reads the header only, not the tensors)."""
    from safetensors import safe_open

    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # SafetensorError and OSError alike
            raise ConfigError(f"{key}: {f} is not a valid safetensors file ({exc}); re-save the model with "
                              "save_pretrained(dir, safe_serialization=True)") from exc


def layer_count(model_config: Any) -> int | None:
    for cfg in (model_config, getattr(model_config, "text_config", None)):
        for name in LAYER_FIELDS:
            n = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(n, int):
                return n
    return None


def _check_student(cfg: Config, i: int | None, teacher_config: Any | None) -> None:
    s = cfg.all_students()[i or 0]
    where = "student" if i is None else f"students[{i}]"
    local_teacher = backend_spec(cfg.teacher.backend).local_weights and cfg.teacher.model is not None
    base_config = teacher_config
    if s.model is not None:
        base_config = check_model(s.model, f"{where}.model")
    if s.init in ("prune", "minitron"):
        if not local_teacher:
            raise ConfigError(f"{where}.init={s.init} needs a local teacher (teacher.model with backend hf)")
        n = layer_count(teacher_config) if teacher_config is not None else None
        if n is not None and s.num_layers is not None and s.num_layers > n:
            raise ConfigError(f"{where}.num_layers={s.num_layers}: the teacher has {n} layers; choose 1..{n}")
        if n is not None and s.layers is not None and (
                any(not 0 <= j < n for j in s.layers) or len(set(s.layers)) != len(s.layers)):
            raise ConfigError(f"{where}.layers={s.layers}: indices must be distinct and in [0, {n - 1}] "
                              f"(the teacher has {n} layers)")
        if s.init == "minitron" and teacher_config is not None:  # the shape it would cut, as a config
            from distill.students.minitron import choose_shape

            try:
                choose_shape(teacher_config, s)
            except ValueError as err:  # its messages name student.*; here the student is named as configured
                raise ConfigError(str(err).replace("student.", f"{where}.")) from err
    elif s.init == "config":
        if s.model is None and not local_teacher:
            raise ConfigError(f"{where}.init=config needs teacher.model or {where}.model for the base config")
        if base_config is not None:
            import copy

            from distill.students.build import config_student

            try:
                config_student(s, copy.deepcopy(base_config))
            except ValueError as err:  # its messages name student.config; here the student is named as configured
                raise ConfigError(str(err).replace("student.config", f"{where}.config", 1)) from err
    elif s.model is None:  # lora, pretrained
        raise ConfigError(f"{where}.init={s.init} needs {where}.model (a hub id or local path)")
    t = cfg.train_for(s)
    if t.signal == "online" and not local_teacher:
        raise ConfigError(f"{where}: train.signal=online needs a local teacher (teacher.backend=hf with "
                          "teacher.model); use train.signal=offline (store) or none (labels)")
    divergences = [term.name for term in t.losses if term.name != "cross_entropy"]
    if t.signal == "none" and divergences:
        raise ConfigError(f"{where}: train.losses has {', '.join(divergences)}, which need a teacher signal, but "
                          "train.signal=none (labels only); use cross_entropy, or train.signal=online / offline")
    if t.input is not None and not str(t.input).startswith("hf:") and not Path(t.input).exists():
        raise ConfigError(f"{where}: train.input {t.input} does not exist")


TRACKER_PACKAGES = {"azure_ml": "azureml"}  # train.report_to names whose package is named otherwise


def check_trackers(report_to: list[str]) -> None:
    """Each tracker in train.report_to is one transformers knows, and installed: its callback would otherwise
    raise inside Trainer construction, after the teacher and student were loaded."""
    import importlib.util

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in report_to:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"train.report_to: unknown tracker '{name}'; use none, all or one of "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        package = TRACKER_PACKAGES.get(name, name)
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to: '{name}' is not installed; `pip install {package}`, or remove "
                              f"it from train.report_to")


def preflight(cfg: Config, stages: tuple[str, ...] = ("generate", "train", "eval")) -> None:
    """Raise ConfigError for anything wrong that can be seen without loading weights."""
    teacher_config = None
    if backend_spec(cfg.teacher.backend).local_weights and cfg.teacher.model:
        teacher_config = check_model(cfg.teacher.model, "teacher.model")
    if "generate" in stages and cfg.generate.input and not cfg.generate.input.startswith("hf:") \
            and not Path(cfg.generate.input).exists():
        raise ConfigError(f"generate.input: {cfg.generate.input} does not exist")
    if "train" in stages:
        check_trackers(cfg.train.report_to)
        students = cfg.all_students()
        for i in range(len(students)):
            _check_student(cfg, i if cfg.students else None, teacher_config)
    if "eval" in stages and cfg.eval.input is None:
        raise ConfigError("eval.input: set the held-out prompts file (JSONL/JSON/CSV/Parquet with references)")
    if "eval" in stages and not cfg.eval.input.startswith("hf:") and not Path(cfg.eval.input).exists() \
            and not (cfg.path(cfg.eval.input) or Path()).exists():
        raise ConfigError(f"eval.input: {cfg.eval.input} does not exist")
