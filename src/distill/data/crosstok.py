"""Cross-tokenizer batches: the teacher reads the same text as the student, tokenized with its own tokenizer.

Used when teacher and student vocabularies differ and every teacher divergence in `train.losses` is a
cross-tokenizer loss (`distill.losses.CROSS_TOKENIZER_LOSSES`: uld, uld_hybrid). Each student example is
decoded back to (prompt text, response text) and tokenized again by the teacher's tokenizer (its BOS and EOS
included), so the two sides hold the same characters; the trainer runs the teacher on `teacher_input_ids`
and `distill.losses.align_responses` pairs the two responses token index by token index.

Limitation: a chat-templated prompt is the *student's* rendering (the teacher sees the student's template
markup as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distill.data.batching import tokenize_pair
from distill.losses.uld import matched_vocab


@dataclass
class CrossTokenizer:
    """What the trainer needs for cross-tokenizer losses."""

    teacher_vocab_size: int  # the teacher tokenizer's true size (padded embedding rows are cut)
    matched: tuple[torch.Tensor, torch.Tensor]  # (teacher ids, student ids) of string-matched tokens

    @classmethod
    def from_tokenizers(cls, student_tok: Any, teacher_tok: Any) -> CrossTokenizer:
        return cls(len(teacher_tok), matched_vocab(student_tok, teacher_tok))


def add_teacher_side(examples: list[dict], student_tok: Any, teacher_tok: Any, max_length: int) -> list[dict]:
    """Each example with `teacher_input_ids` / `teacher_labels`; examples the teacher cannot fit are dropped."""
    out = []
    for ex in examples:
        p = ex["prompt_len"]
        prompt = student_tok.decode(ex["input_ids"][:p], skip_special_tokens=True)
        response = student_tok.decode(ex["input_ids"][p:], skip_special_tokens=True)
        # decoded without special tokens: plain text, so the teacher's own BOS goes in front (one prompt rule)
        t = tokenize_pair(teacher_tok, prompt, response, max_length, rendered_with_template=False)
        if t is None:
            continue
        out.append({**ex, "teacher_input_ids": t["input_ids"], "teacher_labels": t["labels"]})
    return out



@dataclass
class CrossTokenizerCollator:
    """Wraps a collator; right-pads the teacher's ids and labels into `teacher_*` tensors of their own width."""

    base: Any
    teacher_pad_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        width = max(len(e["teacher_input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.teacher_pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["teacher_input_ids"])
            ids[i, :n] = torch.tensor(e["teacher_input_ids"])
            labels[i, :n] = torch.tensor(e["teacher_labels"])
            mask[i, :n] = 1
        batch.update(teacher_input_ids=ids, teacher_attention_mask=mask, teacher_labels=labels)
        return batch
