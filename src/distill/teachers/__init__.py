"""Teacher backends behind one protocol: `hf` (local transformers), `openai` (any compatible endpoint) and
`vllm` (offline engine). `build_teacher(config)` picks one; heavy imports happen only for the chosen one."""

from __future__ import annotations

from distill.config import Config
from distill.teachers.base import Completion, Prompt, Teacher, TeacherError, teacher_identity

BACKENDS = ("hf", "openai", "vllm")


def build_teacher(config: Config, device: str | None = None) -> Teacher:
    """The teacher named by config.teacher.backend; `device` overrides teacher.device (one GPU per rank)."""
    t = config.teacher
    if t.backend == "hf":
        from distill.teachers.hf import HFTeacher

        return HFTeacher(t, config.data, device=device)
    if t.backend == "openai":
        from distill.teachers.openai import OpenAITeacher

        return OpenAITeacher(t, config.data)
    if t.backend == "vllm":
        from distill.teachers.vllm import VLLMTeacher

        return VLLMTeacher(t, config.data, top_k=config.generate.top_k, seed=config.generate.seed)
    raise TeacherError(f"teacher.backend '{t.backend}' is unknown; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Completion", "Prompt", "Teacher", "TeacherError", "build_teacher", "teacher_identity"]
