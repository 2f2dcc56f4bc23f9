"""Cross-tokenizer batches: the teacher reads the same text as the student, tokenized with its own tokenizer.

Used when teacher and student vocabularies differ and every teacher divergence in `train.losses` is a
cross-tokenizer loss (`distill.losses.CROSS_TOKENIZER_LOSSES`: uld, uld_hybrid). Each student example is
decoded back to (prompt text, response text) and tokenized again by the teacher's tokenizer (its BOS and EOS
included), so the two sides hold the same characters; the trainer runs the teacher on `teacher_input_ids`
and `distill.losses.align_responses` pairs the two responses by character offset: the student's prediction
of the response token that starts at character c is compared with the teacher's prediction of its token that
starts at c (both have read the same text up to c). Pairing by token index instead drifts after the first
piece the two tokenizers split differently (a student with one token for "12" against a character-level
teacher compares every later position with the wrong character). `teacher_exact` marks the pairs whose two
tokens are the same string: only there is an id-to-id comparison of shared tokens meaningful (uld_hybrid).

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


def counted_ids(ids: list[int], labels: list[int]) -> list[int]:
    """The ids a loss counts (labels != -100), in order: the response tokens the aligned positions predict."""
    return [i for i, label in zip(ids, labels) if label != -100]


def token_starts(tokenizer: Any, ids: list[int]) -> list[int]:
    """Character offset at which each token starts in `decode(ids, skip_special_tokens=True)`.

    Measured by decoding growing prefixes rather than read from `offset_mapping`, whose conventions differ
    between tokenizers (byte-level BPE trims the leading space of 'Ġworld', Metaspace keeps it), so two
    tokenizers' offsets agree exactly when their decoded text does. Quadratic in the response length
    (~1 ms for 100 tokens); special tokens are zero-length.
    """
    return [len(tokenizer.decode(ids[:j], skip_special_tokens=True)) for j in range(len(ids))]


def align_by_offsets(student_tok: Any, s_ids: list[int], teacher_tok: Any, t_ids: list[int]) -> tuple[list[int], list[int]]:
    """For each counted student token: the index of the teacher token starting at the same character (-1: none)
    and whether the two tokens are the same string (1) or only start together (0).

    Zero-length tokens (EOS and other specials) pair with the teacher's zero-length token at the same offset.
    """
    s_starts, t_starts = token_starts(student_tok, s_ids), token_starts(teacher_tok, t_ids)
    s_text = student_tok.decode(s_ids, skip_special_tokens=True)
    t_text = teacher_tok.decode(t_ids, skip_special_tokens=True)

    def spans(starts: list[int], text: str) -> list[tuple[int, int]]:
        return [(a, b) for a, b in zip(starts, starts[1:] + [len(text)])]

    s_spans, t_spans = spans(s_starts, s_text), spans(t_starts, t_text)
    first: dict[tuple[int, bool], int] = {}
    for k, (a, b) in enumerate(t_spans):
        first.setdefault((a, b == a), k)
    s_strings = student_tok.convert_ids_to_tokens(s_ids)
    t_strings = teacher_tok.convert_ids_to_tokens(t_ids)
    index, exact = [], []
    for j, (a, b) in enumerate(s_spans):
        k = first.get((a, b == a), -1)
        index.append(k)
        if k < 0:
            exact.append(0)
        elif a == b:  # two specials: the same only if the vocabularies name them alike
            exact.append(int(s_strings[j] == t_strings[k]))
        else:
            exact.append(int(t_spans[k] == (a, b) and t_text[a:b] == s_text[a:b]))
    return index, exact


def add_teacher_side(examples: list[dict], student_tok: Any, teacher_tok: Any, max_length: int) -> list[dict]:
    """Each example with `teacher_input_ids` / `teacher_labels` and the offset alignment (`teacher_index`,
    `teacher_exact`, one entry per counted student token); examples the teacher cannot fit are dropped."""
    out = []
    for ex in examples:
        p = ex["prompt_len"]
        prompt = student_tok.decode(ex["input_ids"][:p], skip_special_tokens=True)
        response = student_tok.decode(ex["input_ids"][p:], skip_special_tokens=True)
        # decoded without special tokens: plain text, so the teacher's own BOS goes in front (one prompt rule)
        t = tokenize_pair(teacher_tok, prompt, response, max_length, rendered_with_template=False)
        if t is None:
            continue
        index, exact = align_by_offsets(student_tok, counted_ids(ex["input_ids"], ex["labels"]),
                                        teacher_tok, counted_ids(t["input_ids"], t["labels"]))  # fmt: skip
        out.append({**ex, "teacher_input_ids": t["input_ids"], "teacher_labels": t["labels"],
                    "teacher_index": index, "teacher_exact": exact})  # fmt: skip
    return out



@dataclass
class CrossTokenizerCollator:
    """Wraps a collator; right-pads the teacher's ids and labels into `teacher_*` tensors of their own width and
    the offset alignment into (batch, most counted student tokens) tensors (index -1 / exact 0 as padding)."""

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
        if all("teacher_index" in e for e in examples):
            n = max(1, max(len(e["teacher_index"]) for e in examples))
            index = torch.full((len(examples), n), -1, dtype=torch.long)
            exact = torch.zeros((len(examples), n), dtype=torch.bool)
            for i, e in enumerate(examples):
                index[i, : len(e["teacher_index"])] = torch.tensor(e["teacher_index"], dtype=torch.long)
                exact[i, : len(e["teacher_exact"])] = torch.tensor(e["teacher_exact"], dtype=torch.bool)
            batch.update(teacher_index=index, teacher_exact=exact)
        return batch
