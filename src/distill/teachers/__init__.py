"""Teacher backends behind one protocol, named in one registry (`distill.teachers.registry.BACKENDS`: hf,
openai, vllm, each declaring what it supports). `build_teacher(config)` builds the configured one; heavy
imports happen only for the chosen one."""

from __future__ import annotations

from distill.config import Config
from distill.teachers.base import Completion, Prompt, Teacher, TeacherError, teacher_identity
from distill.teachers.registry import BACKENDS, BackendSpec, UnknownBackend, backend_spec


def build_teacher(config: Config, device: str | None = None, tokenizer=None) -> Teacher:
    """The teacher named by config.teacher.backend; `device` overrides teacher.device (one GPU per rank) and
    `tokenizer` reuses one already loaded (backends with tokenizer access)."""
    try:
        spec = backend_spec(config.teacher.backend)
    except UnknownBackend as exc:
        raise TeacherError(f"teacher.backend: {exc}") from None
    return spec.load().from_config(config, device=device, tokenizer=tokenizer)


__all__ = ["BACKENDS", "BackendSpec", "Completion", "Prompt", "Teacher", "TeacherError", "backend_spec",
           "build_teacher", "teacher_identity"]
