"""The one registry of teacher backends: each entry says what the backend supports, and the code asks it.

A stage never compares `teacher.backend` with a name: it asks `backend_spec(name).local_weights` (can
transformers load the teacher here: online logits, pruning, local eval), `.tokenizer_access` (render chat
templates and tokenize prompts ourselves), `.remote` (an HTTP endpoint: base_url, retries, extra_body, the
API flavour in row keys), `.logprobs` / `.token_ids` (what a completion can carry) or `.takes_device`.
A new backend is one class with a `from_config(config, device=None, tokenizer=None)` classmethod and one
entry here. This module imports nothing of distill, so `distill.config` can validate names against it.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendSpec:
    """One teacher backend and what it supports."""

    name: str
    factory: str  # "module:Class"; imported only when this backend is built (heavy engines stay unloaded)
    description: str
    logprobs: bool  # can return the top-k next-token distribution of each completion token (generate.top_k)
    token_ids: bool  # completions carry token ids of our tokenizer (not only strings)
    tokenizer_access: bool  # we hold its tokenizer: chat templates rendered and prompts tokenized here
    local_weights: bool  # transformers can load its weights here (online logits, pruning, local eval)
    remote: bool  # reached over HTTP (teacher.base_url): retries, extra_body, the API flavour in row keys
    takes_device: bool  # placed on a torch device by teacher.device (one GPU per rank for several workers)

    def load(self) -> Any:
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("hf", "distill.teachers.hf:HFTeacher", "a local transformers model (any device)",
                    logprobs=True, token_ids=True, tokenizer_access=True, local_weights=True, remote=False,
                    takes_device=True),
        BackendSpec("openai", "distill.teachers.openai:OpenAITeacher",
                    "any OpenAI-compatible endpoint (vLLM, SGLang, TGI, transformers serve, a paid API)",
                    logprobs=True, token_ids=False, tokenizer_access=False, local_weights=False, remote=True,
                    takes_device=False),
        BackendSpec("vllm", "distill.teachers.vllm:VLLMTeacher", "the offline vLLM engine (CUDA GPU)",
                    logprobs=True, token_ids=True, tokenizer_access=True, local_weights=True, remote=False,
                    takes_device=False),
    )
}


class UnknownBackend(ValueError):
    """A teacher.backend that is not registered; the message lists the known ones."""


def backend_spec(name: str) -> BackendSpec:
    """The registered backend `name`; UnknownBackend with a did-you-mean otherwise."""
    spec = BACKENDS.get(name)
    if spec is None:
        hint = difflib.get_close_matches(str(name), list(BACKENDS), n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        raise UnknownBackend(f"unknown teacher backend '{name}' (known: {', '.join(BACKENDS)}){extra}")
    return spec
