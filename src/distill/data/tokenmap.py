"""Token strings from an API teacher -> ids of a tokenizer, when the mapping is one-to-one.

An OpenAI-compatible API returns each sampled and top-k token as its decoded text. Those strings are usable
as a logit signal only when each is the text of exactly one id of the student's tokenizer (same model
family, and no byte pieces that decode to the same replacement character). `TokenMap` builds that map once
per tokenizer and says which string fails and why, so a user learns what to change.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


class TokenMapError(ValueError):
    """A token string that is not the text of exactly one id (the message says which one and why)."""


class TokenMap:
    """Decoded text of every id of `tokenizer` -> that id, for texts only one id decodes to."""

    def __init__(self, tokenizer: Any):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        self.counts = Counter(texts)
        self.ids = {t: i for i, t in enumerate(texts) if self.counts[t] == 1}

    def id_of(self, token: str, where: str) -> int:
        i = self.ids.get(token)
        if i is not None:
            return i
        n = self.counts.get(token, 0)
        why = (f"{n} ids of the student's tokenizer decode to it" if n else
               "no id of the student's tokenizer decodes to exactly this text")
        raise TokenMapError(f"{where}: teacher token {token!r} does not map to one token id ({why})")

    def sequence(self, tokens: list[str], where: str) -> list[int]:
        return [self.id_of(t, f"{where}, token {j}") for j, t in enumerate(tokens)]

    def topk(self, tokens: list[list[str]], where: str) -> np.ndarray:
        """(n, k) int32 ids; an empty slot ("", fewer than k alternatives returned) gets id 0."""
        out = np.zeros((len(tokens), len(tokens[0]) if tokens else 0), dtype=np.int32)
        for j, row in enumerate(tokens):
            for s, t in enumerate(row):
                if t:
                    out[j, s] = self.id_of(t, f"{where}, top-k of token {j}")
        return out


CROSS_HINT = ("train with the cross-tokenizer recipe instead (train.losses uld / uld_hybrid with a local "
              "teacher, train.signal=online), or on the teacher's text alone (train.signal: none)")


def missing_ids_reason(row: dict, tokenizer: Any, same_tokenizer: bool) -> str:
    """Why a store row cannot feed offline logit distillation for this student, and what to do."""
    where = f"row {row.get('index')}"
    if not same_tokenizer:
        return (f"{where} has teacher token ids, but not in a tokenizer known to be the student's: for an API "
                "teacher set teacher.tokenizer to the served model's tokenizer (the student's vocabulary); or "
                + CROSS_HINT)
    if row.get("topk_tokens") is not None or row.get("response_tokens") is not None:
        try:
            tm = TokenMap(tokenizer)
            tm.sequence(row.get("response_tokens") or [], where + " response")
            tm.topk(row.get("topk_tokens") or [], where)
        except TokenMapError as exc:
            return f"{exc}; the teacher's top-k cannot be read as student token ids: {CROSS_HINT}"
    if row.get("prompt_ids") is None:
        return (f"{where} has no prompt token ids: an API teacher gives them when teacher.tokenizer names the "
                "served model's tokenizer (regenerate the store with it set); or " + CROSS_HINT)
    return (f"{where} has no teacher token ids/top-k: regenerate with generate.top_k > 0 (and, for an API "
            "teacher, teacher.tokenizer or extra_body {return_tokens_as_token_ids: true}); or " + CROSS_HINT)
