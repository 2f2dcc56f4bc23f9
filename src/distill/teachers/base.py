"""The `Teacher` protocol every backend (hf, openai, vllm) implements, and the objects it exchanges.

A teacher renders prompts the way it will see them, then turns a list of `Prompt`s into `(Prompt,
Completion)` pairs, yielded as they finish so the stage can write them to the store at once: whatever
finished before a crash or an error is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from distill.config import GenerateConfig, TeacherConfig
from distill.data.prompts import Record
from distill.teachers.registry import backend_spec


class TeacherError(RuntimeError):
    """The teacher cannot produce outputs (endpoint down, unknown model, missing engine); says what to do."""


@dataclass
class Prompt:
    """One prompt as the teacher sees it; `index` is its position in the corpus."""

    index: int
    record: Record
    text: str  # the rendered prompt text (chat template applied for local teachers)
    key: str = ""


@dataclass
class Completion:
    """One teacher output. Row i of topk_* is the temperature-1 distribution that predicts token i."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    token_ids: list[int] | None = None  # generated ids, EOS included when generation ended on it
    prompt_ids: list[int] | None = None
    tokens: list[str] | None = None  # API backends: the sampled tokens as strings
    topk_ids: np.ndarray | None = None  # (n_tokens, k) int32; empty slots: id 0 with logprob -inf
    topk_logprobs: np.ndarray | None = None  # (n_tokens, k) float32; -inf in empty slots
    topk_tokens: list[list[str]] | None = None  # API backends that return strings, not ids
    tail: np.ndarray | None = None  # (n_tokens,) = 1 - sum p_topk, clipped at 0
    reasoning: str | None = None
    n_tokens: int | None = None  # completion tokens when no ids/tokens are known (API usage)
    extra: dict[str, Any] = field(default_factory=dict)

    def num_tokens(self) -> int:
        for seq in (self.token_ids, self.tokens):
            if seq is not None:
                return len(seq)
        return int(self.n_tokens or 0)


@runtime_checkable
class Teacher(Protocol):
    """What the generate stage needs from a backend."""

    identity: str  # e.g. "hf:path/to/model"; part of every row key

    def render(self, record: Record) -> str:
        """The prompt text the teacher will see for this record."""

    def generate(self, prompts: list[Prompt], params: GenerateConfig) -> Iterator[tuple[Prompt, Completion]]:
        """Outputs as they finish (any order). Raises TeacherError after yielding what did finish."""

    def close(self) -> None:
        """Free the model or the connections."""


def teacher_identity(tcfg: TeacherConfig) -> str:
    """The teacher part of every row key, e.g. 'hf:Qwen/Qwen3-8B' or 'openai:chat:gpt-4o-mini' (an endpoint's
    API flavour changes what it returns, so it is part of the identity)."""
    if backend_spec(tcfg.backend).remote:
        return f"{tcfg.backend}:{tcfg.api}:{tcfg.model}"
    return f"{tcfg.backend}:{tcfg.model}"


def topk_from_logprobs(logprobs, k: int):
    """(top-k ids int32, top-k logprobs float32, tail float32) from fp32 log-probabilities (n, vocab)."""
    import torch

    k = min(k, logprobs.shape[-1])
    values, ids = torch.topk(logprobs, k, dim=-1)
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    return (ids.to(torch.int32).cpu().numpy(), values.float().cpu().numpy(), tail.float().cpu().numpy())


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string (which is not kept, as in the OpenAI API)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def prefix_ids(tokenizer, ids: list[int], text: str) -> list[int]:
    """The longest prefix of `ids` whose decoded text is a prefix of `text` (binary search: decodes cost).

    Used after a stop string cut the text, so that the stored ids and text stay in step.
    """
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(tokenizer.decode(ids[:mid], skip_special_tokens=True)):
            lo = mid
        else:
            hi = mid - 1
    return ids[:lo]
