"""One name, one place: the teacher-backend registry, the metric registry and the one EOS collector
(issue 14). Each is asked by the code instead of a name compared in several files."""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import pytest
from conftest import make_llama, make_tokenizer

from distill.config import ConfigError, EvalConfig, TeacherConfig, load_config
from distill.evaluation.metrics import METRICS, get_metric, metric_help, rouge_l
from distill.modeling import eos_token_ids
from distill.teachers import build_teacher, teacher_identity
from distill.teachers.registry import BACKENDS, BackendSpec, UnknownBackend, backend_spec

# ------------------------------------------------------------------------------------------ backends


def test_backend_names_validated_against_the_registry():
    with pytest.raises(ConfigError, match=r"unknown teacher backend 'opneai' \(known: hf, openai, vllm\); did "
                                          r"you mean 'openai'\?"):
        load_config({"teacher": {"backend": "opneai"}})
    with pytest.raises(UnknownBackend, match="known: hf, openai, vllm"):
        backend_spec("tgi")
    for name in BACKENDS:
        assert load_config({"teacher": {"backend": name}}).teacher.backend == name
        assert name in TeacherConfig.model_fields["backend"].description  # the field's help lists every one


def test_each_backend_declares_what_it_supports():
    hf, api, vllm = backend_spec("hf"), backend_spec("openai"), backend_spec("vllm")
    assert hf.local_weights and hf.tokenizer_access and hf.token_ids and hf.takes_device and not hf.remote
    assert api.remote and not api.local_weights and not api.tokenizer_access and not api.token_ids
    assert vllm.local_weights and vllm.tokenizer_access and not vllm.remote and not vllm.takes_device
    for spec in BACKENDS.values():
        assert hasattr(spec.load(), "from_config")  # every factory builds from a config the same way


def test_identity_strings_unchanged():
    """Row keys depend on them: a registry change must not invalidate a store."""
    assert teacher_identity(load_config({"teacher": {"backend": "hf", "model": "m"}}).teacher) == "hf:m"
    cfg = load_config({"teacher": {"backend": "openai", "model": "gpt", "api": "completions"}})
    assert teacher_identity(cfg.teacher) == "openai:completions:gpt"


class _EchoTeacher:
    """A backend registered only in this test: the stages must handle it from its declaration alone."""

    built_with: ClassVar[dict] = {}

    def __init__(self, config, device, tokenizer):
        self.identity = "echo"
        _EchoTeacher.built_with = {"device": device, "tokenizer": tokenizer, "model": config.teacher.model}

    @classmethod
    def from_config(cls, config, device=None, tokenizer=None):
        return cls(config, device, tokenizer)


def test_a_new_backend_is_one_registry_entry(monkeypatch):
    from distill.teachers import generate as gen

    module = types.ModuleType("distill_test_echo_backend")
    module.EchoTeacher = _EchoTeacher
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(BACKENDS, "echo", BackendSpec(
        "echo", f"{module.__name__}:EchoTeacher", "a test endpoint", logprobs=False, token_ids=False,
        tokenizer_access=False, local_weights=False, remote=True, takes_device=False))
    cfg = load_config({"teacher": {"backend": "echo", "model": "m", "extra_body": {"x": 1}}})
    assert isinstance(build_teacher(cfg, device="cpu"), _EchoTeacher)
    assert _EchoTeacher.built_with == {"device": "cpu", "tokenizer": None, "model": "m"}
    # the stages ask the declaration: a remote backend has its API flavour in the identity, its extra_body in
    # the generation parameters, and no local tokenizer to load
    assert teacher_identity(cfg.teacher) == "echo:chat:m"
    assert gen.generation_params(cfg)["extra_body"] == {"x": 1}
    assert gen._prompt_tokenizer(cfg) is None


# ------------------------------------------------------------------------------------------- metrics


def test_metric_registry_drives_validation_lookup_and_docs():
    with pytest.raises(ConfigError, match=r"unknown metric 'exact_mach'.*did you mean 'exact_match'\?"):
        load_config({"eval": {"metric": "exact_mach"}})
    assert load_config({"eval": {"metric": "my_mod:f1"}}).eval.metric == "my_mod:f1"  # user metrics pass
    assert get_metric("rouge") is rouge_l and get_metric("rougeL") is rouge_l
    help_text = metric_help()
    for name, spec in METRICS.items():
        same = "the answer is 4"
        assert get_metric(name)(same, same) == 1.0  # every registered metric resolves and scores a match
        assert name in help_text and spec.description in help_text
        assert name in EvalConfig.model_fields["metric"].description
        load_config({"eval": {"metric": name}})


# ----------------------------------------------------------------------------------------------- EOS


def test_eos_token_ids_collects_every_source():
    from types import SimpleNamespace

    from transformers import GenerationConfig, LlamaConfig

    tok = make_tokenizer()
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[7, 5]),
                            config=LlamaConfig(eos_token_id=9))
    assert eos_token_ids(model, tok) == sorted({5, 7, 9, tok.eos_token_id})
    bare = SimpleNamespace(generation_config=GenerationConfig(), config=LlamaConfig(eos_token_id=None))
    assert eos_token_ids(bare, tok) == [tok.eos_token_id]
    assert eos_token_ids(model, None) == [5, 7, 9]


def test_teacher_engine_and_trainer_stop_on_the_same_tokens():
    """Before, the hf teacher ignored model.config's EOS (the engine read it): they disagreed."""
    from distill.config import DataConfig, TeacherConfig
    from distill.serving.engine import Engine
    from distill.teachers.hf import HFTeacher

    tok = make_tokenizer()
    model = make_llama(len(tok), hidden=16, layers=1, heads=2)
    model.config.eos_token_id = [2, 11]  # a chat model with two end tokens in its config only
    model.generation_config.eos_token_id = 2
    teacher = HFTeacher(TeacherConfig(model="tiny"), DataConfig(), model=model, tokenizer=tok)
    engine = Engine(model, tok)
    assert teacher.eos_ids == sorted(engine.eos_ids) == [2, 11]
